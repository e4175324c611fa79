"""The token setup script and the `kms` command, run for real."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SETUP_TOKEN

KMS = str(Path(sys.executable).parent / "kms")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_setup_token_is_idempotent_and_pins_are_private(tmp_path: Path) -> None:
    """A second run changes no file; PIN files are 0600 in a 0700 directory."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["KMS_HOME"] = str(tmp_path)
    subprocess.run([str(SETUP_TOKEN)], env=env, check=True, capture_output=True)
    first = _tree(tmp_path)
    assert any(name.endswith(".token") or "tokens/" in name for name in first)
    for pin in ("user.pin", "so.pin"):
        mode = stat.S_IMODE((tmp_path / "secrets" / pin).stat().st_mode)
        assert mode == 0o600, oct(mode)
        assert len((tmp_path / "secrets" / pin).read_text().strip()) == 32
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    out = subprocess.run([str(SETUP_TOKEN)], env=env, check=True, capture_output=True)
    assert _tree(tmp_path) == first
    assert out.stdout == b""


def _kms(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env.update(KMS_HOME=str(home), SOFTHSM2_CONF=str(home / "softhsm" / "softhsm2.conf"))
    return subprocess.run([KMS, *args], env=env, capture_output=True, text=True, check=check,
                          cwd=REPO)


def test_cli_tenant_and_principal_commands(tmp_path: Path) -> None:
    """init, tenant create/list/show and principal create work with --json; errors are one
    line on stderr with a non-zero exit; the token never lands in the database."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    subprocess.run([str(SETUP_TOKEN)], env={**env, "KMS_HOME": str(tmp_path)}, check=True,
                   capture_output=True)
    init = json.loads(_kms(tmp_path, "init", "--json").stdout)
    assert init["token"] == "kms" and init["service_keys"] == ["audit-hmac", "secrets-kek", "signing"]
    again = json.loads(_kms(tmp_path, "init", "--json").stdout)
    assert again == init  # idempotent
    t = json.loads(_kms(tmp_path, "tenant", "create", "Acme SA", "--json").stdout)
    assert t["status"] == "active" and t["name"] == "Acme SA" and t["id"].startswith("t-")
    dup = _kms(tmp_path, "tenant", "create", "ACME sa", check=False)
    assert dup.returncode != 0 and dup.stderr.count("\n") == 1 and "already_exists" in dup.stderr
    bad = _kms(tmp_path, "tenant", "create", " padded", check=False)
    assert bad.returncode != 0 and "invalid_request" in bad.stderr
    listed = json.loads(_kms(tmp_path, "tenant", "list", "--json").stdout)
    assert [x["id"] for x in listed] == [t["id"]]
    p = json.loads(_kms(tmp_path, "principal", "create", "--tenant", t["id"], "--role",
                        "hypervisor", "--name", "hv1", "--json").stdout)
    assert p["token"].startswith(p["id"] + ".") and len(p["token"]) > 40
    shown = json.loads(_kms(tmp_path, "tenant", "show", t["id"], "--json").stdout)
    assert shown["principals"][0]["id"] == p["id"] and "token" not in json.dumps(shown)
    missing = _kms(tmp_path, "tenant", "show", "t-nothing", check=False)
    assert missing.returncode != 0 and "not_found" in missing.stderr
    nobody = _kms(tmp_path, "principal", "create", "--tenant", "t-nothing", "--role", "app",
                  "--name", "x", check=False)
    assert nobody.returncode != 0 and nobody.stderr.count("\n") == 1
    # Found by a break-it trial: these exited 0 with no output, or named an exception type.
    for bad, code in (("../x", "invalid_request"), ("t-0000000000000000", "not_found")):
        r = _kms(tmp_path, "audit", "export", "--tenant", bad, check=False)
        assert r.returncode == 1 and r.stdout == "" and code in r.stderr, r.stderr
    assert _kms(tmp_path, "audit", "export", "--tenant", t["id"]).stdout.count("\n") >= 1
    lone = tmp_path / "lone.json"
    lone.write_text("{}")
    r = _kms(tmp_path, "erasure", "verify", str(lone), check=False)
    assert r.returncode == 1 and r.stderr == f"kms: error: {lone}.sig: No such file or directory\n"
    db = (tmp_path / "kms.sqlite3").read_bytes()
    secret = p["token"].split(".", 1)[1]
    assert secret.encode() not in db


def test_serve_refuses_a_notice_period_under_21_days(tmp_path: Path) -> None:
    r = subprocess.run([KMS, "serve"], env={**os.environ, "KMS_HOME": str(tmp_path),
                                            "KMS_NOTICE_DAYS": "20"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "notice_days" in r.stderr


def test_cli_operator_principal_revoke_and_access(tmp_path: Path) -> None:
    """operator create reads the password from stdin (never argv) and prints the TOTP URI
    once; revoke and access list work; incompatible roles are refused."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    subprocess.run([str(SETUP_TOKEN)], env={**env, "KMS_HOME": str(tmp_path)}, check=True,
                   capture_output=True)
    _kms(tmp_path, "init")
    kenv = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    kenv.update(KMS_HOME=str(tmp_path), SOFTHSM2_CONF=str(tmp_path / "softhsm" / "softhsm2.conf"))
    created = subprocess.run([KMS, "operator", "create", "alice", "--json"], env=kenv,
                             input="a long operator passphrase\n", capture_output=True,
                             text=True)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["totp_uri"].startswith("otpauth://totp/")
    short = subprocess.run([KMS, "operator", "create", "bob"], env=kenv, input="short\n",
                           capture_output=True, text=True)
    assert short.returncode != 0 and "at least 12" in short.stderr
    db = (tmp_path / "kms.sqlite3").read_bytes()
    assert b"a long operator passphrase" not in db
    assert json.loads(_kms(tmp_path, "operator", "unlock", "alice", "--json").stdout)["locked"] \
        is False
    t = json.loads(_kms(tmp_path, "tenant", "create", "Access SA", "--json").stdout)
    hv = json.loads(_kms(tmp_path, "principal", "create", "--tenant", t["id"], "--role",
                         "hypervisor", "--name", "node1", "--json").stdout)
    clash = _kms(tmp_path, "principal", "create", "--tenant", t["id"], "--role",
                 "tenant-admin", "--name", "node1", check=False)
    assert clash.returncode != 0 and "incompatible_roles" in clash.stderr
    rows = json.loads(_kms(tmp_path, "access", "list", "--tenant", t["id"], "--json").stdout)
    assert {"resource": f"tenant:{t['id']}", "principal": hv["id"], "name": "node1",
            "role": "hypervisor", "actions": ["read"]} in rows
    mine = json.loads(_kms(tmp_path, "access", "list", "--principal", hv["id"], "--json").stdout)
    assert mine and all(r["principal"] == hv["id"] for r in mine)
    assert _kms(tmp_path, "principal", "revoke", hv["id"]).returncode == 0
    assert json.loads(_kms(tmp_path, "access", "list", "--principal", hv["id"],
                           "--json").stdout) == []
    both = _kms(tmp_path, "access", "list", check=False)
    assert both.returncode != 0


def test_cli_refuses_a_home_without_kms_init_and_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "nothing-here"
    r = _kms(home, "tenant", "list", check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "kms init" in r.stderr
    assert not home.exists()


def test_init_makes_the_home_and_database_private(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    subprocess.run([str(SETUP_TOKEN)], env={**env, "KMS_HOME": str(tmp_path)}, check=True,
                   capture_output=True)
    os.chmod(tmp_path, 0o755)
    _kms(tmp_path, "init")
    _kms(tmp_path, "tenant", "create", "Private SA")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    files = list(tmp_path.glob("kms.sqlite3*"))
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in tmp_path.rglob("*")
               if p.is_file())


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    for args in (["principal", "create", "--role", "bogus"], ["nosuch"],
                 ["tenant", "create"], ["audit", "purge"]):
        r = _kms(tmp_path, *args, check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert r.stderr.startswith("kms: error: usage:")
    r = subprocess.run([KMS, "tenant", "list"], capture_output=True, text=True,
                       env={**os.environ, "KMS_HOME": str(tmp_path),
                            "KMS_DATABASE_URL": "garbage"})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "database_url" in r.stderr


@pytest.mark.parametrize("command", ["init", "serve", "tenant list"])
def test_a_database_out_of_reach_is_one_line_without_its_password(
        tmp_path: Path, command: str) -> None:
    """A break-it trial's finding: `kms init` and `kms serve` printed a 140-line
    traceback when the database could not be reached."""
    r = subprocess.run([KMS, *command.split()], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "KMS_HOME": str(tmp_path),
                            "KMS_DATABASE_URL":
                                "postgresql+psycopg://kms:S3cretPW@127.0.0.1:1/kms"})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("kms: error: ") and "S3cretPW" not in r.stderr


def test_a_cli_change_is_anchored_before_the_command_exits(tmp_path: Path) -> None:
    """The token anchor is written off the request path; a one-shot `kms` command still
    writes it before exiting, so truncating its event afterwards is detected."""
    import sqlite3

    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    subprocess.run([str(SETUP_TOKEN)], env={**env, "KMS_HOME": str(tmp_path)}, check=True,
                   capture_output=True)
    _kms(tmp_path, "init")
    _kms(tmp_path, "tenant", "create", "Before")
    db = tmp_path / "kms.sqlite3"
    with sqlite3.connect(db) as c:
        old = c.execute("SELECT seq, hash, mac FROM audit_head").fetchone()
    _kms(tmp_path, "tenant", "create", "After")  # exits right after its commit
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM audit_events WHERE seq > ?", (old[0],))
        c.execute("UPDATE audit_head SET seq = ?, hash = ?, mac = ?", old)
    verify = _kms(tmp_path, "audit", "verify", "--json", check=False)
    assert verify.returncode != 0 and "truncated" in verify.stdout + verify.stderr


def test_cli_output_cut_short_by_its_reader_is_no_error_line(tmp_path: Path) -> None:
    """`kms audit export | head`: the reader closing the pipe is not an error to print."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    subprocess.run([str(SETUP_TOKEN)], env={**env, "KMS_HOME": str(tmp_path)}, check=True,
                   capture_output=True)
    _kms(tmp_path, "init")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    run_env.update(KMS_HOME=str(tmp_path),
                   SOFTHSM2_CONF=str(tmp_path / "softhsm" / "softhsm2.conf"))
    p = subprocess.Popen([KMS, "audit", "export"], env=run_env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before the command has written anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) != 0
    assert "BrokenPipe" not in err and "Traceback" not in err, err


def test_a_journal_wiped_with_its_audit_key_row_cannot_be_started_again(tmp_path: Path) -> None:
    """One journal per token: with the database's journal and audit key row deleted,
    `kms init` refuses to make a second audit key, and verify fails."""
    import sqlite3

    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    subprocess.run([str(SETUP_TOKEN)], env={**env, "KMS_HOME": str(tmp_path)}, check=True,
                   capture_output=True)
    _kms(tmp_path, "init")
    _kms(tmp_path, "tenant", "create", "Wiped SA")
    assert _kms(tmp_path, "audit", "verify").returncode == 0
    db = sqlite3.connect(str(tmp_path / "kms.sqlite3"))
    with db:
        for table in ("audit_events", "audit_head", "audit_checkpoint"):
            db.execute(f"DELETE FROM {table}")
        db.execute("DELETE FROM service_keys WHERE purpose = 'audit-hmac'")
    db.close()
    again = _kms(tmp_path, "init", check=False)
    assert again.returncode != 0 and again.stderr.count("\n") == 1, again.stderr
    assert "already holds an audit journal" in again.stderr
    db = sqlite3.connect(str(tmp_path / "kms.sqlite3"))
    with db:
        assert db.execute("SELECT count(*) FROM service_keys WHERE purpose = 'audit-hmac'"
                          ).fetchone() == (0,)
    db.close()
    assert _kms(tmp_path, "audit", "verify", check=False).returncode != 0


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://kms:Hunter@2:TopSecretPart@db.example/kms",
    "postgresql+psycopg://kms:TopSecretPart@127.0.0.1:abc/kms",
    "postgresql+psycopg://kms:TopSecretPart@[::1:1/kms",
    "sqlite:///:memory:",
])
def test_a_malformed_database_url_is_one_line_without_its_parts(tmp_path: Path, url: str) -> None:
    """A second break-it trial's finding: SQLAlchemy's URL parser quoted the part it
    failed on in a traceback, which was a piece of the password when the password held
    an "@" or ":"; an in-memory SQLite URL failed deep in the engine."""
    for command in ("init", "tenant list"):
        r = subprocess.run([KMS, *command.split()], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "KMS_HOME": str(tmp_path),
                                "KMS_DATABASE_URL": url})
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "database_url" in r.stderr and "TopSecretPart" not in r.stderr
