"""`kms serve`: the tenant API under uvicorn, one process."""

from __future__ import annotations

import logging
import threading

import uvicorn
from sqlalchemy import inspect

from api.app import create_app
from cli.logs import configure_logging
from kms.config import Settings
from kms.errors import InvalidConfiguration
from kms.service import Kms

log = logging.getLogger("kms.serve")


def run_server(settings: Settings, kms: Kms) -> None:
    """Self-test the token, check the schema, then serve until interrupted."""
    configure_logging(settings.log_level)
    if not inspect(kms.db.engine).has_table("tenants"):
        raise InvalidConfiguration("database has no schema: run `kms init` first")
    kms.self_test()
    app = create_app(settings, kms)
    log.info("tenant API listening", extra={"host": settings.host, "port": settings.port})
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=True, proxy_headers=False, server_header=False,
                            timeout_graceful_shutdown=5)
    stop = threading.Event()
    runner = threading.Thread(target=_erasure_loop, args=(kms, settings, stop),
                              name="erasure-runner", daemon=True)
    runner.start()
    try:
        uvicorn.Server(config).run()
    finally:
        stop.set()
        runner.join(timeout=10)
        kms.close()


def _erasure_loop(kms: Kms, settings: Settings, stop: threading.Event) -> None:
    """The periodic erasure task: the same runner as `kms erasure run`."""
    while not stop.wait(settings.erasure_interval_seconds):
        try:
            for outcome in kms.erasure.run_due():
                if outcome.state != "skipped":
                    log.info("erasure run", extra=outcome.public())
        except Exception as exc:  # noqa: BLE001 - the loop must survive a bad run
            log.error("erasure run failed: %s", type(exc).__name__)
