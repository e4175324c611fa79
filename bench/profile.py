"""Sampling profiles of a running server with py-spy (from bench/.peer-venv), and a
summary of where the time goes.

Mode "gil" (`--gil`) keeps only samples of the thread holding the GIL: in a CPU-bound Python server
that is where the core's time goes. Each sample is put in one category, by the
innermost frame that names a known component; the inclusive share of the service's own
functions is listed as well. Mode "wall" (`--idle`, filtered to one route's threads)
shows where a request waits (locks, the database's busy handler, the journal).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("thread hand-offs (anyio thread pool, queues, futures, GIL waits)",
     ("threading.py", "queue.py", "anyio/", "concurrent/futures", "starlette/concurrency.py")),
    ("SQLAlchemy ORM + SQLite", ("sqlalchemy/", "sqlite3/")),
    ("PKCS#11 token (python-pkcs11, SoftHSM)", ("hsm/", "pkcs11/")),
    ("logging (JSON access log)", ("logging/", "cli/logs.py")),
    ("AES-GCM, base64, hashing", ("cryptography/", "kms/aead.py", "base64.py", "hashlib",
                                  "hmac.py")),
    ("pydantic validation", ("pydantic/", "pydantic_core")),
    ("FastAPI/Starlette routing, dependencies, responses", ("fastapi/", "starlette/",
                                                            "json/")),
    ("uvicorn/h11/asyncio (HTTP and event loop)", ("uvicorn/", "h11/", "asyncio/",
                                                   "selectors.py", "ssl.py")),
    ("service code (kms/, api/)", ("kms/", "api/")),
]

_OWN = re.compile(r"\((?:kms|api|hsm|cli)/")
_LINE = re.compile(r":\d+\)$")


def record(py_spy: Path, pid: int, seconds: float, out: Path, *, mode: str = "gil",
           rate: int = 200) -> bool:
    """mode "gil": samples of the GIL holder only (where a CPU-bound Python process spends
    its core); "wall": every thread, idle ones included (where requests wait)."""
    cmd = [str(py_spy), "record", "-p", str(pid), "-d", str(max(1, round(seconds))),
           "-r", str(rate), "-f", "raw", "-o", str(out), "--nonblocking",
           "--gil" if mode == "gil" else "--idle"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and out.exists()


def _frames(stack: str) -> list[str]:
    return [_LINE.sub(")", f) for f in stack.split(";")]


def summarize(raw: Path, *, top: int = 12, only: str | None = None) -> dict[str, Any]:
    """Shares of samples by category, by service function (inclusive) and by leaf.
    `only` keeps the stacks that contain that frame (e.g. one route's threads)."""
    categories: Counter[str] = Counter()
    own: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        if only is not None and only not in frames:
            continue
        total += n
        leaf[frames[-1]] += n
        for f in set(frames):
            if _OWN.search(f) and "cli/main.py" not in f and "run_server" not in f:
                own[f] += n
        for f in reversed(frames):
            cat = next((name for name, keys in _CATEGORIES if any(k in f for k in keys)), None)
            if cat is not None:
                categories[cat] += n
                break
        else:
            categories["other"] += n

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, 100 * v / total) for k, v in counter.most_common(top)] if total else []

    return {"samples": total, "categories": pct(categories), "own_inclusive": pct(own),
            "leaf": pct(leaf)}
