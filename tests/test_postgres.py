"""The production database: the same service over a real throwaway PostgreSQL — schema
by Alembic, replicas coordinated by row locks and advisory locks, never by a home-made
protocol."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest

from kms.clock import FixedClock
from kms.db import Database
from kms.service import Kms, KmsOptions
from tests.conftest import T0, populate


@pytest.fixture
def replicas(kms, postgres_url):  # type: ignore[no-untyped-def]
    """Three Kms "replicas" (separate engines and pools) on one PostgreSQL and the token."""
    clock = FixedClock(T0)
    made = [Kms(db=Database(postgres_url), hsm=kms.hsm, clock=clock,
                options=KmsOptions(key_version_max_encryptions=50)) for _ in range(3)]
    made[0].initialize()
    yield made, clock
    for k in made:
        k.db.dispose()


def test_full_lifecycle_on_postgresql(replicas) -> None:  # type: ignore[no-untyped-def]
    (k, other, _), clock = replicas
    tid, c, tokens = populate(k, "pg lifecycle", volumes=3, keys=1)
    key = k.volumes.fetch_key(c["hypervisor"], "vol-0").key
    hv_elsewhere = other.principals.authenticate(tokens["hypervisor"])
    assert other.volumes.fetch_key(hv_elsewhere, "vol-0").key == key
    ct, _ = k.transit.encrypt(c["app"], "key-0", b"pg")
    assert other.transit.decrypt(other.principals.authenticate(tokens["app"]), "key-0",
                                 ct).reveal() == b"pg"
    k.kek_rotation.rotate(tid)
    assert other.volumes.fetch_key(hv_elsewhere, "vol-0").key == key
    k.lifecycle.serve_notice(tid)
    clock.advance(timedelta(days=21))
    assert other.erasure.erase(tid).state == "erased"
    document, _sig = k.erasure.certificate(tid)
    assert json.loads(document)["deleted_rows"]["volumes"] == 3
    assert k.hsm.find_objects(label_prefix=f"kms/{tid}/") == []
    assert k.audit_verify().ok


def test_replicas_never_erase_one_tenant_twice(replicas) -> None:  # type: ignore[no-untyped-def]
    made, clock = replicas
    tid, _, _ = populate(made[0], "pg race", volumes=2, keys=0)
    made[0].lifecycle.serve_notice(tid)
    clock.advance(timedelta(days=21))
    barrier = threading.Barrier(len(made))
    results: list[str] = []

    def run(k: Kms) -> None:
        barrier.wait()
        results.append(k.erasure.erase(tid).state)

    threads = [threading.Thread(target=run, args=(k,)) for k in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["erased", "skipped", "skipped"], results
    assert made[1].audit_verify().ok


def test_concurrent_writers_on_replicas_make_one_chain(replicas) -> None:  # type: ignore[no-untyped-def]
    made, _ = replicas
    tid, _, tokens = populate(made[0], "pg writers", volumes=0, keys=1)
    before = len(made[0].audit_export())
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        k = made[n % len(made)]
        try:
            hv = k.principals.authenticate(tokens["hypervisor"])
            for i in range(5):
                k.volumes.create(hv, volume_id=f"pw{n}-{i}", cipher="aes-xts-plain64",
                                 key_bits=512)
                k.volumes.fetch_key(hv, f"pw{n}-{i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    events = made[0].audit_export()
    assert len(events) == before + 16 * 5 * 2
    assert [e["seq"] for e in events] == list(range(events[0]["seq"],
                                                    events[0]["seq"] + len(events)))
    assert made[2].audit_verify().ok


def test_replicas_share_one_usage_cap(replicas) -> None:  # type: ignore[no-untyped-def]
    """Two replicas encrypting at once never put more than the cap under one version."""
    made, _ = replicas
    _, _, tokens = populate(made[0], "pg cap", volumes=0, keys=1)
    versions: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(2)

    def encrypt(k: Kms) -> None:
        app = k.principals.authenticate(tokens["app"])
        barrier.wait()
        for _ in range(40):
            _, v = k.transit.encrypt(app, "key-0", b"x")
            with lock:
                versions.append(v)

    threads = [threading.Thread(target=encrypt, args=(k,)) for k in made[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(versions) == 80
    for v in set(versions):
        assert versions.count(v) <= 50, (v, versions.count(v))
