"""Database engine and transactions (SQLite WAL by default, PostgreSQL in production).

`Database.write()` takes the write lock at BEGIN on SQLite (BEGIN IMMEDIATE) so that
concurrent writers wait on the busy timeout instead of failing on lock upgrade.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kms.errors import ServiceUnavailable

SQLITE_BUSY_TIMEOUT_MS = 10_000


class Database:
    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=20, max_overflow=20)
            _configure_sqlite(self.engine)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(kms_write=True),
                                   expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"

    def create_schema(self) -> None:
        """Create or upgrade the schema with the Alembic migrations (idempotent)."""
        from kms.schema import upgrade

        upgrade(self.engine)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._session(self._read) as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception."""
        with self._session(self._write) as s:
            yield s

    @contextmanager
    def _session(self, factory: sessionmaker[Session]) -> Iterator[Session]:
        try:
            with factory() as session, session.begin():
                yield session
        except OperationalError as exc:
            raise ServiceUnavailable("the database is unavailable") from exc

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("kms_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def rowcount(result: Any) -> int:
    """Rows touched by an UPDATE/DELETE result (typed access to CursorResult.rowcount)."""
    return int(getattr(result, "rowcount", 0) or 0)
