"""`kms`: the operators' command. Every command takes --json; errors are one line on
stderr with a non-zero exit code. Secrets never come from argv."""

from __future__ import annotations

import functools
import getpass
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from hsm import HsmError
from kms.audit import AuditContext, audit_context
from kms.config import Settings, load_settings
from kms.errors import KmsError
from kms.service import Kms

F = TypeVar("F", bound=Callable[..., Any])


class Ctx:
    def __init__(self, config: Path | None):
        self.config = config
        self._kms: Kms | None = None
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings

    def kms(self, *, initializing: bool = False) -> Kms:
        """The service over the configured home; refuses (one line) a home that `kms init`
        has not prepared, rather than creating an empty database there."""
        if self._kms is None:
            from cli.wiring import build_kms

            if not initializing:
                require_initialized(self.settings)
            self._kms = build_kms(self.settings)
        return self._kms


def require_initialized(settings: Settings) -> None:
    from kms.errors import InvalidConfiguration

    if settings.database_url is None and not (settings.home_dir / "kms.sqlite3").exists():
        raise InvalidConfiguration(f"no KMS data in {settings.home_dir}: run `kms init` there "
                                   "or set KMS_HOME")


def emit(data: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, ensure_ascii=False) if as_json else human(data))


def command(fn: F) -> F:
    """--json on every command, and one-line errors instead of tracebacks."""
    @click.option("--json", "as_json", is_flag=True, help="machine-readable output")
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KmsError as exc:
            fail(f"{exc.code}: {exc}")
        except HsmError as exc:
            fail(f"token: {exc}")
        except SQLAlchemyError as exc:  # `kms init`/`serve` on a database they cannot reach
            orig = getattr(exc, "orig", None)  # the driver's message names no password
            fail("database: " + (f"{type(orig).__name__}: {orig}" if orig is not None
                                 else type(exc).__name__))
        except BrokenPipeError:  # `kms audit export | head`: the reader has had enough
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:  # a file given on the command line: name it, say why
            fail(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror
                 else f"{type(exc).__name__}: {exc}")
    return wrapper  # type: ignore[return-value]


def restrict_home(home: Path) -> None:
    """The data directory and the SQLite files are readable by the service user only."""
    os.chmod(home, 0o700)
    for path in home.glob("kms.sqlite3*"):
        os.chmod(path, 0o600)


def fail(message: str, code: int = 1) -> None:
    click.echo(f"kms: error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(code)


@click.group()
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML configuration file (environment KMS_* overrides it)")
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """Tenant KMS: operators' command."""
    ctx.obj = Ctx(config)
    os.umask(0o077)  # the database, certificates and keys we write are ours alone
    # Journal events of this command name the local account that ran it.
    ctx.with_resource(audit_context(AuditContext(actor=f"cli:{getpass.getuser()}",
                                                 source="cli")))


@main.command()
@command
@click.pass_obj
def init(obj: Ctx, as_json: bool) -> None:
    """Create the data directory and schema, check the token, create service keys."""
    from cli.tls import ensure_local_pki

    kms = obj.kms(initializing=True)
    keys = kms.initialize()
    restrict_home(obj.settings.home_dir)
    info = kms.hsm.token_info()
    data: dict[str, object] = {"home": str(obj.settings.home_dir), "token": info.label,
                               "serial": info.serial, "service_keys": sorted(keys)}
    if obj.settings.tls_cert is None:
        data["tls"] = ensure_local_pki(obj.settings.home_dir / "tls")
    emit(data, as_json, lambda d: f"initialised {d['home']} (token {d['token']}, "
                                  f"serial {d['serial']})")


@main.command()
@click.option("--host", default=None, help="tenant API address (default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="tenant API port (default 8443)")
@click.option("--admin-port", type=int, default=None, help="admin API port (default 8444)")
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="server certificate (PEM, default $KMS_HOME/tls/server.pem)")
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="server private key (PEM, mode 0600)")
@click.option("--insecure-http", is_flag=True, default=None,
              help="plain HTTP, allowed on loopback only")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="JSON log lines go to this file (reopened if rotated) instead of stderr")
@command
@click.pass_obj
def serve(obj: Ctx, host: str | None, port: int | None, admin_port: int | None,
          tls_cert: Path | None, tls_key: Path | None, insecure_http: bool | None,
          log_file: Path | None, as_json: bool) -> None:
    """Run the tenant API and the admin API (TLS unless --insecure-http)."""
    from cli.serve import check_listen_policy, run_server

    obj._settings = load_settings(obj.config, host=host, port=port, admin_port=admin_port,
                                  tls_cert=tls_cert, tls_key=tls_key,
                                  insecure_http=insecure_http or None, log_file=log_file)
    check_listen_policy(obj.settings)
    run_server(obj.settings, obj.kms())


@main.group()
def tenant() -> None:
    """Tenants."""


def _tenant_line(d: dict[str, Any]) -> str:
    return f"{d['id']}\t{d['status']}\t{d['name']}"


@tenant.command("create")
@click.argument("name")
@command
@click.pass_obj
def tenant_create(obj: Ctx, name: str, as_json: bool) -> None:
    """Create a tenant (and its first KEK in the token)."""
    t = obj.kms().tenants.create(name)
    emit({"id": t.id, "name": t.name, "status": t.status}, as_json, _tenant_line)


@tenant.command("list")
@command
@click.pass_obj
def tenant_list(obj: Ctx, as_json: bool) -> None:
    """List tenants."""
    rows = [{"id": t.id, "name": t.name, "status": t.status,
             "created_at": t.created_at.isoformat()} for t in obj.kms().tenants.list()]
    emit(rows, as_json, lambda rs: "\n".join(_tenant_line(r) for r in rs) or "(no tenants)")


@tenant.command("show")
@click.argument("tenant_id")
@command
@click.pass_obj
def tenant_show(obj: Ctx, tenant_id: str, as_json: bool) -> None:
    """Show one tenant."""
    kms = obj.kms()
    t = kms.tenants.show(tenant_id)
    data = {"id": t.id, "name": t.name, "status": t.status,
            "created_at": t.created_at.isoformat(),
            "principals": kms.principals.list_for_tenant(t.id)}
    emit(data, as_json, lambda d: json.dumps(d, indent=2, ensure_ascii=False))


@tenant.command("offboard")
@click.argument("tenant_id")
@click.option("--contract-end", default=None, metavar="YYYY-MM-DD",
              help="last day of the contract; erasure is never before it")
@click.option("--yes", is_flag=True, help="serve the notice without asking")
@command
@click.pass_obj
def tenant_offboard(obj: Ctx, tenant_id: str, contract_end: str | None, yes: bool,
                    as_json: bool) -> None:
    """Serve the end-of-contract notice (at least 21 days), then erasure of every key."""
    from kms.lifecycle import parse_contract_end

    end = parse_contract_end(contract_end)
    kms = obj.kms()
    t = kms.tenants.show(tenant_id)
    if not yes:
        if not sys.stdin.isatty():
            fail("refusing to serve a notice without --yes on a non-interactive input")
        click.confirm(f"Serve the end-of-contract notice to {t.name} ({t.id})? All its keys "
                      f"will be destroyed at the end of the notice", abort=True)
    notice = kms.lifecycle.serve_notice(tenant_id, contract_end=end)
    emit(notice.public(), as_json,
         lambda d: f"notice {d['id']} served at {d['served_at']}; erasure due at "
                   f"{d['effective_at']}")


def _state_command(name: str, help_text: str, method: str) -> None:
    @tenant.command(name, help=help_text)
    @click.argument("tenant_id")
    @command
    @click.pass_obj
    def _cmd(obj: Ctx, tenant_id: str, as_json: bool) -> None:
        data = getattr(obj.kms().lifecycle, method)(tenant_id)
        emit(data, as_json, lambda d: f"{d['id']}\t{d['status']}")


_state_command("cancel-offboard", "Cancel a pending notice; the tenant is active again.",
               "cancel_notice")
_state_command("suspend", "Suspend a tenant: every use answers 403 until resumed.", "suspend")
_state_command("resume", "Resume a suspended tenant.", "resume")


@tenant.command("rotate-kek")
@click.argument("tenant_id")
@command
@click.pass_obj
def tenant_rotate_kek(obj: Ctx, tenant_id: str, as_json: bool) -> None:
    """New KEK generation, every blob rewrapped, the old generation destroyed (resumes an
    interrupted rotation)."""
    result = obj.kms().kek_rotation.rotate(tenant_id)
    if result.state == "skipped":
        fail("another KEK rotation of this tenant is running")
    emit(result.public(), as_json,
         lambda d: f"{d['tenant_id']}: KEK generation {d['active_generation']} active, "
                   f"{d['rewrapped']} blob(s) rewrapped, destroyed {d['destroyed_generations']}")


@main.group()
def erasure() -> None:
    """End-of-contract erasure."""


@erasure.command("run")
@command
@click.pass_obj
def erasure_run(obj: Ctx, as_json: bool) -> None:
    """Erase every tenant whose notice has expired; failures are retried next run."""
    outcomes = [o.public() for o in obj.kms().erasure.run_due()]
    emit(outcomes, as_json, lambda rows: "\n".join(
        f"{r['tenant_id']}\t{r['state']}" + (f"\t{r['error']}" if r["error"] else "")
        for r in rows) or "nothing due")
    if any(o["state"] == "erasure_failed" for o in outcomes):
        sys.exit(1)


@erasure.command("status")
@command
@click.pass_obj
def erasure_status(obj: Ctx, as_json: bool) -> None:
    """Pending notices and erasures, with their state and last error."""
    rows = obj.kms().erasure.status()
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['tenant_id']}\t{r['state']}\tdue {r['effective_at']}"
        + (f"\t{r['last_error']}" if r["last_error"] else "") for r in rs) or "nothing pending")


@erasure.command("certificate")
@click.argument("tenant_id")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write FILE (canonical JSON) and FILE.sig (DER signature)")
@command
@click.pass_obj
def erasure_certificate(obj: Ctx, tenant_id: str, output: Path | None, as_json: bool) -> None:
    """The signed erasure certificate of a tenant."""
    import base64

    document, signature = obj.kms().erasure.certificate(tenant_id)
    if output is None:
        emit({"document": document.decode(), "signature": base64.b64encode(signature).decode()},
             as_json, lambda d: d["document"])
        return
    output.write_bytes(document)
    Path(f"{output}.sig").write_bytes(signature)
    emit({"certificate": str(output), "signature": f"{output}.sig"}, as_json,
         lambda d: f"wrote {d['certificate']} and {d['signature']}")


@erasure.command("verify")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@command
@click.pass_obj
def erasure_verify(obj: Ctx, file: Path, as_json: bool) -> None:
    """Verify FILE against FILE.sig with the service's public key."""
    kms = obj.kms()
    document, signature = file.read_bytes(), Path(f"{file}.sig").read_bytes()
    with kms.db.read() as s:
        ok = kms.signer.verify(s, document, signature)
    if not ok:
        fail("signature does not verify")
    emit({"valid": True}, as_json, lambda d: "valid signature")


@main.group()
def service() -> None:
    """The service's own keys."""


@service.command("public-key")
@command
@click.pass_obj
def service_public_key(obj: Ctx, as_json: bool) -> None:
    """Print the signing public key (PEM) that verifies notices and certificates."""
    pem = obj.kms().service_public_key_pem()
    emit({"public_key_pem": pem}, as_json, lambda d: d["public_key_pem"].rstrip("\n"))


@main.group()
def principal() -> None:
    """Tenant principals (bearer tokens)."""


@principal.command("create")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--role", required=True, type=click.Choice(["tenant-admin", "hypervisor", "app"]))
@click.option("--name", required=True)
@command
@click.pass_obj
def principal_create(obj: Ctx, tenant_id: str, role: str, name: str, as_json: bool) -> None:
    """Create a principal; its token is printed once and never stored."""
    issued = obj.kms().principals.create(tenant_id=tenant_id, role=role, name=name)
    data = {"id": issued.principal_id, "tenant": issued.tenant_id, "role": issued.role,
            "token": issued.token}
    emit(data, as_json, lambda d: f"principal {d['id']} ({d['role']})\n"
                                  f"token (shown once): {d['token']}")


@principal.command("revoke")
@click.argument("principal_id")
@command
@click.pass_obj
def principal_revoke(obj: Ctx, principal_id: str, as_json: bool) -> None:
    """Revoke a principal; its token is refused from now on."""
    data = obj.kms().principals.revoke(principal_id)
    emit(data, as_json, lambda d: f"{d['id']}\trevoked")


@main.group()
def access() -> None:
    """Access rights (9.3 d, e)."""


@access.command("list")
@click.option("--tenant", "tenant_id", default=None)
@click.option("--principal", "principal_id", default=None)
@command
@click.pass_obj
def access_list(obj: Ctx, tenant_id: str | None, principal_id: str | None, as_json: bool) -> None:
    """Who can do what on which resource, per tenant or per principal."""
    if (tenant_id is None) == (principal_id is None):
        fail("give exactly one of --tenant or --principal", 2)
    kms = obj.kms()
    rows = (kms.access.for_tenant(tenant_id) if tenant_id
            else kms.access.for_principal(principal_id or ""))
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['resource']}\t{r['principal']}\t{r['role']}\t{','.join(r['actions'])}"
        for r in rs) or "(no access)")


@main.group()
def operator() -> None:
    """The provider's operators (admin API)."""


def read_new_password() -> str:
    """From a hidden prompt (asked twice) on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        value: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
        return value
    return sys.stdin.readline().rstrip("\r\n")


@operator.command("create")
@click.argument("username")
@command
@click.pass_obj
def operator_create(obj: Ctx, username: str, as_json: bool) -> None:
    """Create an operator; prints the TOTP provisioning URI once."""
    new = obj.kms().operators.create(username, read_new_password())
    emit({"username": new.username, "totp_uri": new.totp_uri}, as_json,
         lambda d: f"operator {d['username']} created\nTOTP (shown once): {d['totp_uri']}")


@operator.command("passwd")
@click.argument("username")
@command
@click.pass_obj
def operator_passwd(obj: Ctx, username: str, as_json: bool) -> None:
    """Set a new password (from a prompt or stdin)."""
    obj.kms().operators.set_password(username, read_new_password())
    emit({"username": username, "password": "changed"}, as_json,
         lambda d: f"password of {d['username']} changed")


@operator.command("unlock")
@click.argument("username")
@command
@click.pass_obj
def operator_unlock(obj: Ctx, username: str, as_json: bool) -> None:
    """Unlock an operator locked after consecutive failures."""
    obj.kms().operators.unlock(username)
    emit(obj.kms().operators.status(username), as_json,
         lambda d: f"{d['username']} unlocked")


@main.group()
def audit() -> None:
    """The audit journal (12.6-12.8)."""


@audit.command("verify")
@command
@click.pass_obj
def audit_verify(obj: Ctx, as_json: bool) -> None:
    """Check every event's HMAC, the chain, the sequence and the head."""
    result = obj.kms().audit_verify()
    data = {"ok": result.ok, "events": result.events, "first_bad_seq": result.first_bad_seq,
            "reason": result.reason}
    if not result.ok:
        if as_json:
            click.echo(json.dumps(data))
        fail(f"audit journal broken at sequence {result.first_bad_seq}: {result.reason}")
    emit(data, as_json, lambda d: f"audit journal intact ({d['events']} events)")


def _parse_time(value: str | None, field: str) -> datetime | None:
    from kms.clock import require_aware
    from kms.errors import InvalidRequest

    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{field}: give an ISO 8601 date or time", field=field) from None
    if parsed.tzinfo is None and len(value) == 10:  # a bare date means 00:00 UTC
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return require_aware(parsed)
    except ValueError:
        raise InvalidRequest(f"{field}: naive times are refused, add a zone",
                             field=field) from None
    except OverflowError:
        raise InvalidRequest(f"{field}: out of range", field=field) from None


@audit.command("export")
@click.option("--tenant", "tenant_id", default=None)
@click.option("--since", default=None, help="ISO 8601 time with a zone, or a date (UTC)")
@command
@click.pass_obj
def audit_export(obj: Ctx, tenant_id: str | None, since: str | None, as_json: bool) -> None:
    """Events as JSON lines, all or one tenant's."""
    for event in obj.kms().audit_export(tenant_id=tenant_id,
                                        since=_parse_time(since, "since")):
        click.echo(json.dumps(event, ensure_ascii=False))


@audit.command("purge")
@click.option("--before", required=True, help="YYYY-MM-DD (UTC) or an ISO time with a zone")
@command
@click.pass_obj
def audit_purge(obj: Ctx, before: str, as_json: bool) -> None:
    """Delete events older than BEFORE, never younger than the retention; the chain stays
    verifiable from a signed checkpoint."""
    from datetime import timedelta

    when = _parse_time(before, "before")
    assert when is not None
    n = obj.kms().audit_purge(before=when,
                              retention=timedelta(days=obj.settings.audit_retention_days))
    emit({"deleted": n}, as_json, lambda d: f"{d['deleted']} events purged")


def run() -> None:
    """The console script: click's usage errors too end as one line on stderr."""
    try:
        main(standalone_mode=False)
    except click.exceptions.UsageError as exc:
        fail(f"usage: {exc.format_message()} (see kms --help)", 2)
    except click.exceptions.Abort:
        fail("aborted", 1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)


if __name__ == "__main__":
    run()
