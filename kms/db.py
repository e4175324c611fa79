"""Database engine and transactions (SQLite WAL by default, PostgreSQL in production).

`Database.write()` takes the write lock at BEGIN on SQLite (BEGIN IMMEDIATE) so that
concurrent writers wait on the busy timeout instead of failing on lock upgrade.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from hsm import inline
from kms.clock import require_aware
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
        self._local = threading.local()
        self._write_lock = threading.RLock()
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
        self._may_read_inline()
        with self._session(self._read) as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception.
        Never on an event loop (`hsm.inline`): a writer may wait for the write lock."""
        inline.may_block()
        with self._writer(), self._session(self._write) as s:
            yield s

    def _writer(self) -> Any:
        """SQLite has one writer at a time: this process's writers queue on a lock (in
        order, woken at once) rather than poll in SQLite's busy handler, which sleeps up
        to 100 ms between tries (volume creation p99 of 2 s under 16 writers)."""
        return self._write_lock if self.is_sqlite else contextlib.nullcontext()

    @contextmanager
    def query(self) -> Iterator[Connection]:
        """A read-only Core connection for the hot paths (no ORM session, no identity
        map); its transaction is rolled back at the end."""
        self._may_read_inline()
        try:
            with self.engine.connect() as conn:
                yield conn
        except OperationalError as exc:
            raise ServiceUnavailable("the database is unavailable") from exc

    # -- the hot paths' SQL: plain DB-API on a pooled connection ------------------------
    # SQLAlchemy's Core costs 60-180 us a statement on the reference machine, its ORM
    # 160-310 us, SQLite itself 2-5 us (bench/README.md): the data plane, which runs a
    # couple of primary-key reads a request, talks DB-API directly. Statements are written
    # with `?` placeholders and translated once for PostgreSQL (`%s`).

    def sql(self, statement: str) -> str:
        return statement if self.is_sqlite else statement.replace("?", "%s")

    def fetchone(self, statement: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """One row of a read-only statement (from `sql()`), or None."""
        self._may_read_inline()
        try:
            if self.is_sqlite:
                # A connection of this thread's own: no pool checkout and return (they
                # cost more than the query).
                found = self._reader().execute(statement, params).fetchone()
                return None if found is None else tuple(found)
            conn = self.engine.raw_connection()
            try:
                cur = conn.cursor()
                cur.execute(statement, params)
                row = cur.fetchone()
                cur.close()
                return None if row is None else tuple(row)
            finally:
                conn.close()  # back to the pool, rolled back
        except self._dbapi_errors as exc:
            raise ServiceUnavailable("the database is unavailable") from exc

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only SQLite connection (autocommit: each SELECT reads one
        consistent snapshot), opened on first use and again after a fork."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = sqlite3.connect(self.engine.url.database or "", isolation_level=None,
                                   check_same_thread=True)
            conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only=ON")
            local.conn, local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def raw_write(self) -> Iterator[Any]:
        """A DB-API cursor in a write transaction (BEGIN IMMEDIATE on SQLite), committed
        on success and rolled back on any exception. Never on an event loop."""
        inline.may_block()
        with self._writer(), self._raw_transaction() as cur:
            yield cur

    @contextmanager
    def _raw_transaction(self) -> Iterator[Any]:
        try:
            conn = self._sqlite_writer() if self.is_sqlite else self.engine.raw_connection()
        except self._dbapi_errors as exc:
            raise ServiceUnavailable("the database is unavailable") from exc
        try:
            cur = conn.cursor()
            if self.is_sqlite:
                cur.execute("BEGIN IMMEDIATE")
            yield cur
            if self.is_sqlite:
                cur.execute("COMMIT")
            else:
                conn.commit()
        except self._integrity_errors:
            self._abort_raw(conn)
            raise  # a constraint: the caller says which (e.g. "volume exists")
        except self._dbapi_errors as exc:
            self._abort_raw(conn)
            raise ServiceUnavailable("the database is unavailable") from exc
        except BaseException:
            self._abort_raw(conn)
            raise
        finally:
            if not self.is_sqlite:
                conn.close()  # back to the pool

    def _sqlite_writer(self) -> sqlite3.Connection:
        """This thread's SQLite connection for DB-API writes, opened on first use and
        again after a fork: the journal's writer commits hundreds of times a second, and
        a pool checkout and return cost it more than its statements."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "writer", None)
        if conn is None or local.writer_pid != os.getpid():
            conn = sqlite3.connect(self.engine.url.database or "", isolation_level=None,
                                   check_same_thread=True, timeout=30)
            _sqlite_pragmas(conn)
            local.writer, local.writer_pid = conn, os.getpid()
        return conn

    def _abort_raw(self, conn: Any) -> None:
        if not self.is_sqlite:
            _abort(conn)
            return
        try:
            conn.rollback()  # sqlite3 rolls back an open transaction even in autocommit mode
        except Exception:  # noqa: BLE001 - the connection is given up: the next opens anew
            self._local.writer = None
            with contextlib.suppress(Exception):
                conn.close()

    @property
    def integrity_error(self) -> type[BaseException]:
        """The DB-API's IntegrityError (raised through `raw_write`)."""
        err: type[BaseException] = self.engine.dialect.loaded_dbapi.IntegrityError
        return err

    @property
    def _integrity_errors(self) -> tuple[type[BaseException], ...]:
        return (self.integrity_error,)

    def bind_time(self, value: datetime) -> Any:
        """An aware datetime as `models.UTCDateTime` stores it, for plain DB-API writes."""
        utc = require_aware(value)
        return utc.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f") if self.is_sqlite \
            else utc

    @property
    def _dbapi_errors(self) -> tuple[type[BaseException], ...]:
        module = self.engine.dialect.loaded_dbapi
        return (module.Error,)

    def _may_read_inline(self) -> None:
        # SQLite reads in WAL mode do not wait for writers: fine on the event loop.
        # A PostgreSQL read is a network round trip: run it in a thread.
        if not self.is_sqlite:
            inline.may_block()

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
        local = self._local
        for name, pid in (("conn", "pid"), ("writer", "writer_pid")):
            conn = getattr(local, name, None)
            if conn is not None and getattr(local, pid) == os.getpid():
                conn.close()  # this thread's; other threads' close with their thread
            setattr(local, name, None)
        self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own is deferred).
        dbapi_conn.isolation_level = None
        _sqlite_pragmas(dbapi_conn)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("kms_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def _sqlite_pragmas(conn: Any) -> None:
    """Every connection that may write: WAL, the busy timeout, foreign keys, and an fsync
    at every commit (synchronous=FULL: a committed journal event survives a power cut)."""
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def _abort(conn: Any) -> None:
    try:
        conn.rollback()  # sqlite3 rolls back an open transaction even in autocommit mode
    except Exception:  # noqa: BLE001 - the connection is being given up anyway
        conn.invalidate()


def rowcount(result: Any) -> int:
    """Rows touched by an UPDATE/DELETE result (typed access to CursorResult.rowcount)."""
    return int(getattr(result, "rowcount", 0) or 0)
