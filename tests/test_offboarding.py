"""End of contract (19.4): notice, deadline, erasure, certificate — in process, with a
clock moved by hand, on the real token."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kms.clock import FixedClock
from kms.errors import (
    InvalidState,
    TenantErased,
    TenantInNotice,
    TenantSuspended,
    Unauthenticated,
)
from kms.keyring import tenant_label_prefix
from kms.lifecycle import effective_at
from tests.conftest import populate

DAY = timedelta(days=1)
NOTICE = timedelta(days=21)


def verify(kms, document: bytes, signature: bytes) -> None:  # type: ignore[no-untyped-def]
    pub = load_pem_public_key(kms.service_public_key_pem().encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(signature, document, ec.ECDSA(hashes.SHA256()))


def test_notice_is_signed_bilingual_and_21_days(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    tid, _, _ = populate(kms, "notice doc")
    n = kms.lifecycle.serve_notice(tid)
    assert n.served_at == clock.now() and n.effective_at == clock.now() + NOTICE
    doc = json.loads(n.document)
    assert doc["tenant"]["id"] == tid and doc["notice_period_days"] == 21
    assert "Destruction des clés" in doc["fr"]["methode"] and "Destruction" in doc["en"]["method"]
    assert doc["scope"] == {"volumes": 2, "application_keys": 1, "principals": 3}
    assert n.document == json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                    ensure_ascii=False).encode()
    verify(kms, n.document, n.signature)
    assert kms.tenants.show(tid).status == "notice"
    with pytest.raises(InvalidState):
        kms.lifecycle.serve_notice(tid)


def test_contract_end_later_than_21_days_wins(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    tid, _, _ = populate(kms, "contract end", volumes=0, keys=0)
    n = kms.lifecycle.serve_notice(tid, contract_end=date(2026, 3, 31))
    assert n.effective_at == datetime(2026, 4, 1, tzinfo=timezone.utc)
    tid2, _, _ = populate(kms, "contract end early", volumes=0, keys=0)
    n2 = kms.lifecycle.serve_notice(tid2, contract_end=date(2026, 1, 6))
    assert n2.effective_at == clock.now() + NOTICE


def test_during_notice_existing_keys_work_and_creation_is_409(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    tid, callers, _ = populate(kms, "in notice")
    ct, _ = kms.transit.encrypt(callers["app"], "key-0", b"before")
    kms.lifecycle.serve_notice(tid)
    assert kms.transit.decrypt(callers["app"], "key-0", ct).reveal() == b"before"
    assert kms.volumes.fetch_key(callers["hypervisor"], "vol-0").key_bits == 512
    kms.transit.encrypt(callers["app"], "key-0", b"still works")
    with pytest.raises(TenantInNotice):
        kms.volumes.create(callers["hypervisor"], volume_id="new", cipher="aes-xts-plain64",
                           key_bits=512)
    with pytest.raises(TenantInNotice):
        kms.appkeys.create(callers["tenant-admin"], name="new", key_type="aes256-gcm")
    with pytest.raises(TenantInNotice):  # a new version is something new too
        kms.appkeys.rotate(callers["tenant-admin"], "key-0")
    kms.volumes.delete(callers["hypervisor"], "vol-1")  # deleting stays possible


def test_cancel_returns_to_active(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    tid, callers, _ = populate(kms, "cancelled", volumes=0, keys=0)
    kms.lifecycle.serve_notice(tid)
    assert kms.lifecycle.cancel_notice(tid)["status"] == "active"
    clock.advance(NOTICE + DAY)
    assert all(o.tenant_id != tid for o in kms.erasure.run_due())
    assert kms.tenants.show(tid).status == "active"
    kms.volumes.create(callers["hypervisor"], volume_id="after", cipher="aes-xts-plain64",
                       key_bits=512)


def test_suspend_blocks_every_use_including_cached_keys(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    tid, callers, tokens = populate(kms, "suspended")
    ct, _ = kms.transit.encrypt(callers["app"], "key-0", b"x")  # now cached
    kms.lifecycle.suspend(tid)
    with pytest.raises(TenantSuspended):
        kms.principals.authenticate(tokens["app"])
    with pytest.raises(TenantSuspended):  # a caller authenticated before the change
        kms.transit.decrypt(callers["app"], "key-0", ct)
    with pytest.raises(TenantSuspended):
        kms.volumes.fetch_key(callers["hypervisor"], "vol-0")
    assert kms.lifecycle.resume(tid)["status"] == "active"
    app = kms.principals.authenticate(tokens["app"])
    assert kms.transit.decrypt(app, "key-0", ct).reveal() == b"x"


def test_suspended_during_notice_resumes_to_notice_and_is_still_erased(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    tid, _, _ = populate(kms, "suspended in notice", volumes=1, keys=0)
    kms.lifecycle.serve_notice(tid)
    kms.lifecycle.suspend(tid)
    assert kms.lifecycle.resume(tid)["status"] == "notice"
    kms.lifecycle.suspend(tid)
    clock.advance(NOTICE)
    assert kms.erasure.erase(tid).state == "erased"


def test_erasure_destroys_everything_and_certifies(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    tid, callers, tokens = populate(kms, "full erasure", volumes=3, keys=2)
    kek_ids = [o.cka_id for o in kms.hsm.find_objects(label_prefix=tenant_label_prefix(tid))]
    assert len(kek_ids) == 1
    orphan = kms.hsm.generate_aes_kek(label=f"{tenant_label_prefix(tid)}kek/orphan")
    kms.lifecycle.serve_notice(tid)
    clock.advance(NOTICE)
    assert kms.erasure.erase(tid).state == "erased"
    assert kms.hsm.find_objects(label_prefix=tenant_label_prefix(tid)) == []
    for cka in kek_ids + [orphan]:
        assert kms.hsm.find_objects(cka_id=cka) == []
    assert kms.tenants.show(tid).status == "erased"
    for tok in tokens.values():
        with pytest.raises(Unauthenticated):
            kms.principals.authenticate(tok)
    with pytest.raises(TenantErased):
        kms.volumes.fetch_key(callers["hypervisor"], "vol-0")
    document, signature = kms.erasure.certificate(tid)
    verify(kms, document, signature)
    cert = json.loads(document)
    assert cert["tenant"]["id"] == tid
    assert sorted(cert["destroyed_objects"]) == sorted(c.hex() for c in kek_ids + [orphan])
    assert cert["deleted_rows"] == {"volumes": 3, "app_keys": 2, "app_key_versions": 2,
                                    "principals": 3, "deleted_volume_records": 0}
    assert cert["absence_check"]["result"] == "no object found"
    assert cert["token"]["model"] and cert["token"]["serial"]
    assert "destruction of the encryption keys" in cert["erasure"]["method"]["en"]
    # erased is final
    for op in (kms.lifecycle.resume, kms.lifecycle.suspend, kms.lifecycle.cancel_notice,
               kms.lifecycle.serve_notice):
        with pytest.raises(InvalidState):
            op(tid)
    assert kms.erasure.erase(tid).state == "skipped"
    assert kms.erasure.certificate(tid) == (document, signature)


@pytest.mark.parametrize("served_local", [
    datetime(2026, 3, 29, 1, 30, tzinfo=ZoneInfo("Europe/Paris")),   # before spring forward
    datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo("Europe/Paris")),  # ambiguous hour, fold 0
    datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Paris")),
    datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc),
])
def test_deadline_is_exactly_21x24h_across_dst(clocked, served_local) -> None:  # type: ignore[no-untyped-def]
    """Due at served_at + 21×24 h to the microsecond, not one second before."""
    kms, clock = clocked
    clock.set(served_local)
    tid, _, _ = populate(kms, f"dst {served_local.isoformat()} {served_local.fold}",
                         volumes=1, keys=0)
    n = kms.lifecycle.serve_notice(tid)
    assert n.served_at.tzinfo == timezone.utc
    assert n.effective_at - n.served_at == timedelta(hours=21 * 24)
    clock.set(n.effective_at - timedelta(seconds=1))
    assert kms.erasure.erase(tid).state == "skipped"
    assert tid not in kms.erasure.due_tenants()
    assert kms.tenants.show(tid).status == "notice"
    clock.set(n.effective_at)
    assert tid in kms.erasure.due_tenants()
    assert kms.erasure.erase(tid).state == "erased"


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError):
        FixedClock(datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        effective_at(served_at=datetime(2026, 1, 1), notice_days=21, contract_end=None)


def test_notice_period_is_configurable_upward_only(settings) -> None:  # type: ignore[no-untyped-def]
    from kms.config import load_settings
    from kms.errors import InvalidConfiguration

    with pytest.raises(InvalidConfiguration):
        load_settings(None, home=settings.home, notice_days=20)
    assert load_settings(None, home=settings.home, notice_days=30).notice_days == 30


def test_two_runners_never_erase_the_same_tenant_at_once(clocked, settings) -> None:  # type: ignore[no-untyped-def]
    """Runners racing on one due tenant: one erases, the others skip; one certificate."""
    import threading

    from cli.wiring import build_kms

    kms, clock = clocked
    tid, _, _ = populate(kms, "raced", volumes=2, keys=1)
    kms.lifecycle.serve_notice(tid)
    clock.advance(NOTICE)
    others = [build_kms(settings, clock=clock) for _ in range(3)]
    barrier = threading.Barrier(4)
    results: list[str] = []

    def run(k) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()
        results.append(k.erasure.erase(tid).state)

    threads = [threading.Thread(target=run, args=(k,)) for k in [kms, *others]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("erased") == 1 and results.count("skipped") == 3, results
    assert kms.tenants.show(tid).status == "erased"
    for k in others:
        k.db.dispose()


def test_named_lock_excludes_a_second_holder_and_dies_with_it(kms) -> None:  # type: ignore[no-untyped-def]
    from kms.locks import NamedLocks

    a, b = NamedLocks(kms.db), NamedLocks(kms.db)
    with a.try_lock("erasure:x") as got_a:
        assert got_a
        with b.try_lock("erasure:x") as got_b:
            assert not got_b
        with b.try_lock("erasure:y") as got_other:
            assert got_other
    with b.try_lock("erasure:x") as got_b:
        assert got_b


def test_other_processes_cached_keys_are_swept_after_a_state_change(clocked, settings) -> None:  # type: ignore[no-untyped-def]
    """A replica that cached a tenant's keys drops them once another process (here a
    second Kms, as `kms erasure run` would be) changes the tenant's state."""
    from cli.wiring import build_kms

    kms, clock = clocked
    tid, callers, _ = populate(kms, "swept", volumes=0, keys=1)
    kms.transit.encrypt(callers["app"], "key-0", b"cached")
    assert tid in kms.transit._cache.tenant_epochs()
    other = build_kms(settings, clock=clock)
    try:
        other.lifecycle.suspend(tid)
    finally:
        other.db.dispose()
    assert kms.transit.sweep_cache() >= 1
    assert tid not in kms.transit._cache.tenant_epochs()
