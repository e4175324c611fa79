"""Named locks that die with their holder, so a crashed runner never blocks the next.

SQLite (one host): `flock` on a file beside the database. PostgreSQL (many replicas):
a session-level advisory lock on a dedicated connection, released by the server when
the holder's connection ends. No home-made protocol, no lease to wait out.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text

from kms.db import Database


class NamedLocks:
    def __init__(self, db: Database):
        self._db = db

    def _lock_dir(self) -> Path:
        database = self._db.engine.url.database
        if not database or database == ":memory:":
            raise RuntimeError("file locks need an on-disk SQLite database")
        path = Path(database).resolve().parent / "locks"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    @contextmanager
    def try_lock(self, name: str) -> Iterator[bool]:
        """Yield True if the lock was taken (released on exit), False if someone holds it."""
        digest = hashlib.sha256(name.encode()).digest()
        if self._db.is_sqlite:
            fd = os.open(self._lock_dir() / f"{digest.hex()[:32]}.lock",
                         os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                try:
                    yield True
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
            return
        key = int.from_bytes(digest[:8], "big", signed=True)
        with self._db.engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
