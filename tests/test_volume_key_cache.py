"""Released volume keys kept in memory for a bounded time, so that a key fetched again
(a boot storm, a retry, a multi-attach) skips the token. DESIGN: any plaintext key held
in memory is dropped when the tenant changes state; a deleted volume's key is dropped at
once; nothing outlives the cache's time limit."""

from __future__ import annotations

import pytest

from kms.errors import NotFound, TenantSuspended
from tests.conftest import populate


@pytest.fixture
def unwraps(clocked, monkeypatch):  # type: ignore[no-untyped-def]
    """The places the token unwrapped a volume key for (the real adapter, counted)."""
    kms, _ = clocked
    calls: list[bytes] = []
    real = kms.keyring.unwrap_with

    def counting(kek_cka_id, place, wrapped):  # type: ignore[no-untyped-def]
        calls.append(place)
        return real(kek_cka_id, place, wrapped)

    monkeypatch.setattr(kms.keyring, "unwrap_with", counting)
    return calls


def cached_tenants(kms) -> set[str]:  # type: ignore[no-untyped-def]
    return set(kms.volumes._cache.tenant_epochs())


def test_a_key_fetched_again_comes_from_memory(clocked, unwraps) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    tid, callers, _ = populate(kms, "vk cache hit", volumes=2, keys=0)
    hv = callers["hypervisor"]
    first = kms.volumes.fetch_key(hv, "vol-0").key.reveal()
    again = kms.volumes.fetch_key(hv, "vol-0").key.reveal()
    other = kms.volumes.fetch_key(hv, "vol-1").key.reveal()
    assert first == again and len(first) == 64 and other != first
    assert len(unwraps) == 2  # vol-0 once, vol-1 once
    assert tid in cached_tenants(kms)


def test_each_tenant_gets_its_own_key_under_the_same_volume_id(clocked, unwraps) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    _, a, _ = populate(kms, "vk tenant a", volumes=1, keys=0)
    _, b, _ = populate(kms, "vk tenant b", volumes=1, keys=0)
    ka = kms.volumes.fetch_key(a["hypervisor"], "vol-0").key.reveal()
    kb = kms.volumes.fetch_key(b["hypervisor"], "vol-0").key.reveal()
    assert ka != kb
    assert kms.volumes.fetch_key(a["hypervisor"], "vol-0").key.reveal() == ka
    assert kms.volumes.fetch_key(b["hypervisor"], "vol-0").key.reveal() == kb
    assert len(unwraps) == 2


def test_a_state_change_drops_the_tenants_keys(clocked, unwraps) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    tid, callers, _ = populate(kms, "vk suspended", volumes=1, keys=0)
    hv = callers["hypervisor"]
    key = kms.volumes.fetch_key(hv, "vol-0").key.reveal()
    kms.lifecycle.suspend(tid)
    assert tid not in cached_tenants(kms)
    with pytest.raises(TenantSuspended):
        kms.volumes.fetch_key(hv, "vol-0")
    kms.lifecycle.resume(tid)
    assert kms.volumes.fetch_key(hv, "vol-0").key.reveal() == key
    assert len(unwraps) == 2  # after the resume, from the token again


def test_a_deleted_volume_is_dropped_and_its_id_reused_gets_a_new_key(clocked, unwraps) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    tid, callers, _ = populate(kms, "vk deleted", volumes=1, keys=0)
    hv = callers["hypervisor"]
    old = kms.volumes.fetch_key(hv, "vol-0").key.reveal()
    kms.volumes.delete(hv, "vol-0")
    assert tid not in cached_tenants(kms)
    with pytest.raises(NotFound):
        kms.volumes.fetch_key(hv, "vol-0")
    kms.volumes.create(hv, volume_id="vol-0", cipher="aes-xts-plain64", key_bits=512)
    new = kms.volumes.fetch_key(hv, "vol-0").key.reveal()
    assert new != old and len(unwraps) == 2


def test_a_kek_rotation_rewraps_and_the_key_is_unwrapped_again(clocked, unwraps) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    tid, callers, _ = populate(kms, "vk kek rotation", volumes=1, keys=0)
    hv = callers["hypervisor"]
    key = kms.volumes.fetch_key(hv, "vol-0").key.reveal()
    kms.kek_rotation.rotate(tid)  # rewraps (an unwrap of its own)
    before = len(unwraps)
    assert kms.volumes.fetch_key(hv, "vol-0").key.reveal() == key
    assert len(unwraps) == before + 1  # the new blob, under the new KEK
    assert kms.volumes.fetch_key(hv, "vol-0").key.reveal() == key
    assert len(unwraps) == before + 1


def test_entries_expire_and_the_sweep_forgets_them(clocked, unwraps) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    tid, callers, _ = populate(kms, "vk expiry", volumes=1, keys=0)
    hv = callers["hypervisor"]
    cache = kms.volumes._cache
    now = [1000.0]
    cache._now = lambda: now[0]
    kms.volumes.fetch_key(hv, "vol-0")
    now[0] += cache.ttl - 1
    kms.volumes.fetch_key(hv, "vol-0")
    assert len(unwraps) == 1
    now[0] += 2  # past the limit since the first release (a hit does not extend it)
    kms.volumes.fetch_key(hv, "vol-0")
    assert len(unwraps) == 2
    now[0] += cache.ttl + 1
    assert tid in cached_tenants(kms)
    assert kms.sweep_caches() >= 1
    assert tid not in cached_tenants(kms)


def test_no_cache_when_its_time_limit_is_zero(settings, unwraps) -> None:  # type: ignore[no-untyped-def]
    from cli.wiring import build_kms

    k = build_kms(settings.model_copy(update={"volume_key_cache_seconds": 0}))
    try:
        _, callers, _ = populate(k, "vk no cache", volumes=1, keys=0)
        real = k.keyring.unwrap_with
        calls: list[bytes] = []
        k.keyring.unwrap_with = lambda c, p, w: calls.append(p) or real(c, p, w)  # type: ignore[method-assign]
        for _ in range(3):
            k.volumes.fetch_key(callers["hypervisor"], "vol-0")
        assert len(calls) == 3 and not k.volumes._cache.tenant_epochs()
    finally:
        k.db.dispose()


def test_another_processes_state_change_is_swept(clocked, settings, unwraps) -> None:  # type: ignore[no-untyped-def]
    from cli.wiring import build_kms

    kms, clock = clocked
    tid, callers, _ = populate(kms, "vk swept", volumes=1, keys=0)
    kms.volumes.fetch_key(callers["hypervisor"], "vol-0")
    other = build_kms(settings, clock=clock)
    try:
        other.lifecycle.suspend(tid)
    finally:
        other.db.dispose()
    assert tid in cached_tenants(kms)
    assert kms.sweep_caches() >= 1
    assert tid not in cached_tenants(kms)


def test_the_cache_shows_no_key_in_its_repr(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    _, callers, _ = populate(kms, "vk repr", volumes=1, keys=0)
    key = kms.volumes.fetch_key(callers["hypervisor"], "vol-0").key.reveal()
    text = repr(kms.volumes._cache) + repr(kms.volumes)
    assert key.hex() not in text and repr(key) not in text


def test_erasure_leaves_no_key_of_the_tenant_in_memory(clocked) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    kms, clock = clocked
    tid, callers, _ = populate(kms, "vk erased", volumes=2, keys=0)
    kms.lifecycle.serve_notice(tid)
    kms.volumes.fetch_key(callers["hypervisor"], "vol-0")  # keys still work under notice
    assert tid in cached_tenants(kms)
    clock.advance(timedelta(days=21))
    assert kms.erasure.erase(tid).state == "erased"
    assert tid not in cached_tenants(kms)


def test_the_sweep_forgets_a_volume_deleted_or_rewrapped_elsewhere(clocked, settings) -> None:  # type: ignore[no-untyped-def]
    """A break-it trial's finding: a key released here stayed in memory until its time
    limit after another replica deleted the volume (never served: the row is read on
    every fetch). The sweep now forgets it, and a key whose blob a KEK rotation
    rewrapped; the other volumes' keys stay."""
    from cli.wiring import build_kms

    kms, clock = clocked
    tid, callers, tokens = populate(kms, "vk swept volume", volumes=3, keys=0)
    hv = callers["hypervisor"]
    for v in ("vol-0", "vol-1", "vol-2"):
        kms.volumes.fetch_key(hv, v)

    def held() -> set[str]:
        return {str(k[1]) for k in kms.volumes._cache.keys() if k[0] == tid}

    other = build_kms(settings, clock=clock)
    try:
        other.volumes.delete(other.principals.authenticate(tokens["hypervisor"]), "vol-1")
    finally:
        other.db.dispose()
    assert held() == {"vol-0", "vol-1", "vol-2"}
    assert kms.sweep_caches() == 1
    assert held() == {"vol-0", "vol-2"}
    kms.kek_rotation.rotate(tid)
    assert kms.sweep_caches() == 2
    assert held() == set()
    kms.volumes.fetch_key(hv, "vol-0")
    assert kms.sweep_caches() == 0 and held() == {"vol-0"}


def test_a_failing_periodic_task_does_not_skip_the_sweep(caplog) -> None:  # type: ignore[no-untyped-def]
    """A second break-it trial's note: the sweep shared one try block with the due
    erasures, so a failing erasure run skipped that round's sweep (and rotations).
    Each periodic task now runs on its own (`cli.serve._erasure_loop`)."""
    import threading
    from types import SimpleNamespace

    from cli.serve import _erasure_loop

    stop = threading.Event()
    ran: list[str] = []

    def failing() -> list[object]:
        ran.append("erasure")
        if ran.count("erasure") >= 3:
            stop.set()  # so that a loop that never reaches the others still ends
        raise RuntimeError("erasure run failed")

    def rotations() -> list[object]:
        ran.append("rotations")
        stop.set()
        return []

    kms = SimpleNamespace(erasure=SimpleNamespace(run_due=failing),
                          sweep_caches=lambda: ran.append("sweep") or 0,
                          kek_rotation=SimpleNamespace(run_due=rotations))
    _erasure_loop(kms, SimpleNamespace(erasure_interval_seconds=0), stop)  # type: ignore[arg-type]
    assert ran == ["erasure", "sweep", "rotations"]
    assert any(getattr(r, "task", None) == "erasure" for r in caplog.records)
