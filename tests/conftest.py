"""Shared fixtures: one fresh SoftHSM token per test session (never a fake HSM),
real SQLite, the real tenant API in process through Starlette's TestClient."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

# The Makefile exports KMS_HOME for the service; tests build their own homes.
for _name in [n for n in os.environ if n.startswith("KMS_") or n == "SOFTHSM2_CONF"]:
    del os.environ[_name]

REPO = Path(__file__).resolve().parent.parent
SETUP_TOKEN = REPO / "softhsm-setup" / "setup-token.sh"


def make_token_home(home: Path) -> Path:
    """Run the real setup script into `home`; returns the SoftHSM config path."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["KMS_HOME"] = str(home)
    subprocess.run([str(SETUP_TOKEN)], env=env, check=True, capture_output=True)
    return home / "softhsm" / "softhsm2.conf"


@pytest.fixture(scope="session")
def kms_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("kms-home")
    conf = make_token_home(home)
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by SoftHSM at C_Initialize
    return home


@pytest.fixture(scope="session")
def settings(kms_home: Path):  # type: ignore[no-untyped-def]
    from kms.config import load_settings

    # Many databases share this session's token (fresh ones per test).
    return load_settings(None, home=kms_home, max_request_bytes=64 * 1024,
                         token_shared_by_databases=True)


@pytest.fixture(scope="session")
def kms(settings):  # type: ignore[no-untyped-def]
    from cli.wiring import build_kms

    k = build_kms(settings)
    k.initialize()
    yield k
    k.close()


@pytest.fixture(scope="session")
def client(settings, kms):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings, kms), raise_server_exceptions=False) as c:
        yield c


@dataclass
class TenantCtx:
    id: str
    tokens: dict[str, str]

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


_counter = iter(range(1_000_000))


@pytest.fixture(scope="session")
def new_tenant(kms) -> Callable[[], TenantCtx]:  # type: ignore[no-untyped-def]
    """Factory: a fresh active tenant with one principal of each role."""
    def make() -> TenantCtx:
        t = kms.tenants.create(f"tenant {os.getpid()}-{next(_counter)}")
        tokens = {role: kms.principals.create(tenant_id=t.id, role=role,
                                              name=f"{role}-1").token
                  for role in ("tenant-admin", "hypervisor", "app")}
        return TenantCtx(t.id, tokens)

    return make


@pytest.fixture
def tenant(new_tenant) -> Iterator[TenantCtx]:  # type: ignore[no-untyped-def]
    yield new_tenant()


T0 = datetime(2026, 1, 5, 10, 0, tzinfo=timezone.utc)


@pytest.fixture
def clocked(settings, kms):  # type: ignore[no-untyped-def]
    """A second Kms on the same token and database whose clock tests move by hand."""
    from cli.wiring import build_kms
    from kms.clock import FixedClock

    clock = FixedClock(T0)
    k = build_kms(settings, clock=clock)
    yield k, clock
    k.db.dispose()


def populate(kms, name: str, *, volumes: int = 2, keys: int = 1):  # type: ignore[no-untyped-def]
    """A tenant with volumes and app keys, through the services; returns
    (tenant id, {role: Caller}, {role: token})."""
    t = kms.tenants.create(name)
    tokens = {role: kms.principals.create(tenant_id=t.id, role=role, name=f"{role}-1").token
              for role in ("tenant-admin", "hypervisor", "app")}
    callers = {role: kms.principals.authenticate(tok) for role, tok in tokens.items()}
    for i in range(volumes):
        kms.volumes.create(callers["hypervisor"], volume_id=f"vol-{i}", cipher="aes-xts-plain64",
                           key_bits=512)
    for i in range(keys):
        kms.appkeys.create(callers["tenant-admin"], name=f"key-{i}", key_type="aes256-gcm")
    return t.id, callers, tokens


@pytest.fixture(scope="session")
def postgres_url():  # type: ignore[no-untyped-def]
    from tests.pg import throwaway_postgres

    with throwaway_postgres() as url:
        if url is None:
            pytest.skip("PostgreSQL server binaries are not installed "
                        "(apt-get install postgresql; `make test` does it)")
        yield url
