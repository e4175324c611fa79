"""`kms serve`: the tenant API and the admin API, two servers in one process, TLS on
both unless `--insecure-http` (loopback only); the periodic erasure runner beside them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from sqlalchemy import inspect

from api.app import create_admin_app, create_app
from cli.logs import configure_logging
from cli.tls import server_context
from kms.config import Settings
from kms.errors import InvalidConfiguration
from kms.service import Kms

log = logging.getLogger("kms.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_policy(settings: Settings) -> None:
    """Refuse configurations that DESIGN.md forbids, before anything listens."""
    if settings.insecure_http and not (is_loopback(settings.host)
                                       and is_loopback(settings.admin_host)):
        raise InvalidConfiguration("plain HTTP (--insecure-http) is allowed on loopback only")
    if not is_loopback(settings.admin_host) and not settings.admin_allow_remote:
        raise InvalidConfiguration("the admin API listens on loopback unless "
                                   "KMS_ADMIN_ALLOW_REMOTE=true")
    if settings.port == settings.admin_port and settings.host == settings.admin_host:
        raise InvalidConfiguration("the tenant and admin APIs need two ports")


def _check_free(host: str, port: int) -> None:
    """Fail with one line before anything starts, rather than from inside uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidConfiguration(f"cannot listen on {host}:{port}: "
                                       f"{exc.strerror or exc}") from None


class _Server(uvicorn.Server):
    """Signals are handled once for both servers, by `run_server`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _config(app: Any, host: str, port: int, tls: ssl.SSLContext | None) -> uvicorn.Config:
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=True,
                            proxy_headers=False, server_header=False,
                            timeout_graceful_shutdown=5)
    config.load()
    if tls is not None:
        config.ssl = tls  # our context: TLS 1.2/1.3, AEAD suites, no compression
    return config


def run_server(settings: Settings, kms: Kms) -> None:
    """Self-test the token, check the schema, then serve until SIGINT/SIGTERM."""
    configure_logging(settings.log_level, str(settings.log_file) if settings.log_file else None)
    check_listen_policy(settings)
    if not inspect(kms.db.engine).has_table("tenants"):
        raise InvalidConfiguration("database has no schema: run `kms init` first")
    kms.self_test()
    for host, port in ((settings.host, settings.port), (settings.admin_host, settings.admin_port)):
        _check_free(host, port)
    tls = admin_tls = None
    if not settings.insecure_http:
        cert, key = settings.effective_tls_cert, settings.effective_tls_key
        if not (cert.exists() and key.exists()):
            raise InvalidConfiguration(f"no TLS certificate at {cert}: run `kms init` or give "
                                       "--tls-cert/--tls-key")
        # Client certificates (KMS_TLS_CLIENT_CA), when configured, guard the tenant port:
        # hypervisors and applications then need a certificate from that CA as well.
        tls = server_context(cert, key, client_ca=settings.tls_client_ca)
        admin_tls = server_context(cert, key)
    servers = [
        _Server(_config(create_app(settings, kms), settings.host, settings.port, tls)),
        _Server(_config(create_admin_app(settings, kms), settings.admin_host,
                        settings.admin_port, admin_tls)),
    ]
    scheme = "http" if tls is None else "https"
    log.info("listening", extra={"tenant_api": f"{scheme}://{settings.host}:{settings.port}",
                                 "admin_api": f"{scheme}://{settings.admin_host}:"
                                              f"{settings.admin_port}"})
    stop = threading.Event()
    runner = threading.Thread(target=_erasure_loop, args=(kms, settings, stop),
                              name="erasure-runner", daemon=True)

    def _exit(signum: int, _frame: Any) -> None:
        for server in servers:
            if server.should_exit and signum == signal.SIGINT:
                server.force_exit = True
            server.should_exit = True

    previous = {sig: signal.signal(sig, _exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    runner.start()
    # Everything built so far lives as long as the process: keep the garbage collector
    # from walking it again at every full collection (pauses of the event loop).
    gc.collect()
    gc.freeze()
    try:
        asyncio.run(_serve_all(servers))
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        if exc.code not in (0, None):
            raise InvalidConfiguration(
                f"cannot listen on {settings.host}:{settings.port} or "
                f"{settings.admin_host}:{settings.admin_port} (address in use?)") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.set()
        runner.join(timeout=10)
        kms.close()


async def _serve_all(servers: list[_Server]) -> None:
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for s in servers:  # one stopped (or failed to bind): stop the other too
        s.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    if any(not s.started for s in servers):
        raise InvalidConfiguration("a listener could not start (port in use?)")


def _erasure_loop(kms: Kms, settings: Settings, stop: threading.Event) -> None:
    """The periodic tasks: due erasures (as `kms erasure run`) and scheduled KEK
    rotations (as `kms tenant rotate-kek`)."""
    while not stop.wait(settings.erasure_interval_seconds):
        # Each task on its own: one that fails (an erasure, a rotation) must not keep the
        # others from running this round, the key caches' sweep among them.
        for name, task in (("erasure", lambda: _run_erasures(kms)),
                           ("cache sweep", kms.sweep_caches),
                           ("KEK rotation", lambda: _run_rotations(kms))):
            try:
                task()
            except Exception as exc:  # noqa: BLE001 - the loop must survive a bad run
                log.error("periodic task failed: %s", type(exc).__name__,
                          extra={"task": name})


def _run_erasures(kms: Kms) -> None:
    for outcome in kms.erasure.run_due():
        if outcome.state != "skipped":
            log.info("erasure run", extra=outcome.public())


def _run_rotations(kms: Kms) -> None:
    for rotation in kms.kek_rotation.run_due():
        if rotation.state != "skipped":
            log.info("KEK rotated", extra={"tenant": rotation.tenant_id,
                                           "rewrapped": rotation.rewrapped})
