"""Structured JSON logs; --log-file is reopened when rotated or removed."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.logs import configure_logging


@contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """The service's logging into `path` for the block, then the root logger as it was
    (handlers flushed and closed)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", str(path))
        yield
        for h in root.handlers:
            h.flush()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_log_file_is_reopened_after_rotation_and_removal(tmp_path: Path) -> None:
    path = tmp_path / "kms.log"
    with logging_to(path):
        log = logging.getLogger("kms.test")
        log.info("first", extra={"tenant": "t-1"})
        path.rename(tmp_path / "kms.log.1")
        log.info("second")
        path.unlink()
        log.info("third")
    rotated = [json.loads(x) for x in (tmp_path / "kms.log.1").read_text().splitlines()]
    current = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["msg"] for r in rotated] == ["first"] and rotated[0]["tenant"] == "t-1"
    assert [r["msg"] for r in current] == ["third"]
    assert set(current[0]) >= {"ts", "level", "logger", "msg"}


def test_exceptions_are_logged_by_type_only(tmp_path: Path) -> None:
    from cli.logs import JsonFormatter

    try:
        raise ValueError("secret-material-123")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "secret-material-123" not in line and json.loads(line)["exc_type"] == "ValueError"


def test_the_apps_report_nothing_to_an_opentelemetry_provider(
        settings, kms, tenant, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """FastAPI 0.165 sends spans, metrics and log records (exception messages and stack
    traces) to any OpenTelemetry provider configured in the process, and adds exporters
    when FASTAPI_OTEL_AUTO_CONFIGURE=true. With providers configured and that variable
    set, neither app asks a provider for anything: a request, a validation failure, an
    unhandled error."""
    from unittest import mock

    from fastapi.testclient import TestClient
    from opentelemetry import _logs, metrics, trace

    from api.app import create_admin_app, create_app

    providers = {name: mock.MagicMock(name=name) for name in ("trace", "metrics", "logs")}
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: providers["trace"])
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: providers["metrics"])
    monkeypatch.setattr(_logs, "get_logger_provider", lambda: providers["logs"])
    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    app = tenant.auth("app")
    with TestClient(create_app(settings, kms), raise_server_exceptions=False) as c, \
            TestClient(create_admin_app(settings, kms), raise_server_exceptions=False) as a:
        assert c.post("/v1/keys", json={"name": "otel"},
                      headers=tenant.auth("tenant-admin")).status_code == 201
        assert c.post("/v1/keys/otel/encrypt", json={"plaintext": "aGk="},
                      headers=app).status_code == 200
        assert c.post("/v1/keys/otel/encrypt", json={"plaintext": 5},
                      headers=app).status_code == 400
        assert a.get("/admin/v1/tenants").status_code == 401
    for name, provider in providers.items():
        assert provider.mock_calls == [], (name, provider.mock_calls[:3])


def test_the_access_line_leaves_out_the_query_string(tmp_path: Path) -> None:
    """A break-it trial's finding: `GET /v1/volumes?access_token=<token>` (refused, 401)
    put the token in uvicorn's access line. The line keeps the path and that there was a
    query, nothing of it."""
    path = tmp_path / "kms.log"
    access = logging.getLogger("uvicorn.access")
    with logging_to(path):
        # What uvicorn's h11 protocol logs for each request (uvicorn 0.55).
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                    "/v1/volumes?access_token=kms_tok_SECRET&x", "1.1", 401)
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/v1/volumes",
                    "1.1", 200)
    text = path.read_text()
    lines = [json.loads(x)["msg"] for x in text.splitlines()]
    assert "SECRET" not in text and "access_token" not in text
    assert lines == ['127.0.0.1:5000 - "GET /v1/volumes?… HTTP/1.1" 401',
                     '127.0.0.1:5000 - "GET /v1/volumes HTTP/1.1" 200']
