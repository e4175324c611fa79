"""Structured JSON logs; --log-file is reopened when rotated or removed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cli.logs import configure_logging


def test_log_file_is_reopened_after_rotation_and_removal(tmp_path: Path) -> None:
    path = tmp_path / "kms.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", str(path))
        log = logging.getLogger("kms.test")
        log.info("first", extra={"tenant": "t-1"})
        path.rename(tmp_path / "kms.log.1")
        log.info("second")
        path.unlink()
        log.info("third")
        for h in root.handlers:
            h.flush()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
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
