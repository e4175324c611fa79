"""Structured JSON log lines on stderr for the service itself."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import datetime, timezone

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "color_message"}


def _message(record: logging.LogRecord) -> str:
    """The record's message; uvicorn's access line without the query string's contents
    (a client that puts a token there, `?access_token=…`, must not find it in the log):
    `/path?…` says that there was one."""
    args = record.args
    if (record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) >= 3
            and isinstance(args[2], str) and "?" in args[2]):
        return str(record.msg) % (*args[:2], args[2].partition("?")[0] + "?…", *args[3:])
    return record.getMessage()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: messages and tracebacks could carry data.
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "INFO", log_file: str | None = None) -> None:
    """JSON lines on stderr, or in `log_file`, reopened when rotated or removed."""
    handler: logging.Handler = (logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
                                if log_file else logging.StreamHandler(sys.stderr))
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
