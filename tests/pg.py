"""A throwaway PostgreSQL server for the PostgreSQL suite (Debian's binaries)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def throwaway_postgres() -> Iterator[str | None]:
    """Yield a SQLAlchemy URL of a fresh server on 127.0.0.1, or None if PostgreSQL's
    server binaries are not installed. PostgreSQL refuses to run as root: as root the
    server runs as the `postgres` account."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        yield None
        return
    as_user: list[str] = []
    data = tempfile.mkdtemp(prefix="kms-pg-", dir="/tmp")
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres", "postgres")
    os.chmod(data, 0o700)
    port = _free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", data, "-A", "trust", "-U", "kms", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True)
        subprocess.run([*as_user, pg_ctl, "-D", data, "-l", f"{data}/server.log", "-w", "-o",
                        f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off "
                        "-c max_connections=200", "start"], check=True, capture_output=True)
        yield f"postgresql+psycopg://kms@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
