"""Key lifecycle: versions and their states, rewrap, usage caps, KEK rotation, usage
separation, and the complete erasure of one deleted volume."""

from __future__ import annotations

import os
import shutil
import sqlite3
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import select

import kms.kekrotation as kr
from hsm import HsmKeyUsageRefused
from kms import aead
from kms.clock import FixedClock
from kms.db import Database
from kms.errors import (
    DecryptionFailed,
    InvalidState,
    KeyDisabled,
    KeyIntegrityError,
    KeyVersionUnavailable,
)
from kms.kekrotation import KekRotation, KekStillReferenced
from kms.models import AppKey, AppKeyVersion, Kek, ServiceKey, Volume
from kms.service import Kms, KmsOptions
from tests.conftest import T0, populate

# -- NIST SP 800-38D / McGrew-Viega GCM test vectors (AES-256, 96-bit IV, 128-bit tag) --
K15 = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308"
P15 = ("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
       "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255")
C15 = ("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
       "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad")
VECTORS = [  # (key, iv, plaintext, aad, ciphertext, tag)
    ("00" * 32, "00" * 12, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"),
    ("00" * 32, "00" * 12, "00" * 16, "", "cea7403d4d606b6e074ec5d3baf39d18",
     "d0d1c8a799996bf0265b98b5d48ab919"),
    (K15, "cafebabefacedbaddecaf888", P15, "", C15, "b094dac5d93471bdec1a502270e3cc6c"),
    (K15, "cafebabefacedbaddecaf888", P15[:120], "feedfacedeadbeeffeedfacedeadbeefabaddad2",
     C15[:120], "76fc6ece0f4e1768cddf8853bb2d551b"),
]


@pytest.mark.parametrize("key,iv,pt,aad,ct,tag", VECTORS)
def test_nist_gcm_vectors_through_the_in_process_path(key, iv, pt, aad, ct, tag) -> None:  # type: ignore[no-untyped-def]
    cipher = AESGCM(bytes.fromhex(key))
    sealed = aead.seal(cipher, bytes.fromhex(pt), aad=bytes.fromhex(aad), nonce=bytes.fromhex(iv))
    assert sealed == bytes.fromhex(iv + ct + tag)
    assert aead.open_sealed(cipher, sealed, aad=bytes.fromhex(aad)) == bytes.fromhex(pt)
    with pytest.raises(DecryptionFailed):
        aead.open_sealed(cipher, sealed[:-1] + bytes([sealed[-1] ^ 1]), aad=bytes.fromhex(aad))


def test_a_batch_is_sealed_as_one_item_at_a_time_would_be() -> None:
    """aead.seal_formatted (the batch path: nonces drawn in one call) writes what
    format_ciphertext(seal(...)) writes: each item opens under its own AAD and no other,
    and every nonce is fresh."""
    cipher = AESGCM(os.urandom(32))
    prefix = aead.app_aad_prefix(key_name="k", version=7)
    items = [(os.urandom(n), ctx) for n, ctx in ((0, b""), (1, b"a"), (1024, b""),
                                                  (33, b"ctx" * 50))] * 50
    out = aead.seal_formatted(cipher, 7, prefix, items)
    assert len(out) == len(items)
    nonces = set()
    for text, (plaintext, context) in zip(out, items, strict=True):
        version, blob = aead.parse_ciphertext(text)
        assert version == 7
        nonces.add(blob[:aead.NONCE_BYTES])
        aad = aead.app_aad(key_name="k", version=7, context=context)
        assert aead.open_sealed(cipher, blob, aad=aad) == plaintext
        with pytest.raises(DecryptionFailed):
            aead.open_sealed(cipher, blob, aad=aad + b"x")
    assert len(nonces) == len(items)
    assert aead.seal_formatted(cipher, 7, prefix, []) == []


def small_cap_kms(kms: Kms, clock: FixedClock, db: Any = None, cap: int = 5) -> Kms:
    return Kms(db=db or kms.db, hsm=kms.hsm, clock=clock,
               options=KmsOptions(key_version_max_encryptions=cap))


def test_the_encryption_after_the_cap_is_served_by_a_new_version(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    k = small_cap_kms(kms, clock)
    tid, c, _ = populate(k, "capped", volumes=0, keys=1)
    versions = [k.transit.encrypt(c["app"], "key-0", b"x")[1] for _ in range(6)]
    assert versions == [1, 1, 1, 1, 1, 2]
    assert k.appkeys.show(c["app"], "key-0").latest_version == 2
    actions = [e["object"] for e in k.audit_export(tenant_id=tid) if e["action"] == "key.rotate"]
    assert actions == ["key:key-0:v2:usage-cap"]


def test_a_restored_database_cannot_reopen_a_capped_version(kms, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The token remembers the high-water mark that a database backup forgets.

    A database of its own (a restored copy of the session's database would roll back the
    session's journal, which the token's anchor then refuses), with data-plane events
    off, so that the backup's journal is whole: this test is about the usage cap."""
    clock = FixedClock(T0)
    opts = KmsOptions(key_version_max_encryptions=5, audit_data_plane=False)
    live = Database(f"sqlite:///{tmp_path / 'live.sqlite3'}")
    k = Kms(db=live, hsm=kms.hsm, clock=clock, options=opts)
    k.initialize()
    tid, c, tokens = populate(k, "restored", volumes=0, keys=1)
    assert k.audit.flush_anchor()
    backup = tmp_path / "before.sqlite3"
    with sqlite3.connect(str(live.engine.url.database)) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    assert [k.transit.encrypt(c["app"], "key-0", b"x")[1] for _ in range(5)] == [1] * 5
    live.dispose()
    restored_db = Database(f"sqlite:///{backup}")
    try:
        old = Kms(db=restored_db, hsm=kms.hsm, clock=clock, options=opts)
        with restored_db.read() as s:
            key = s.scalars(select(AppKey).where(AppKey.tenant_id == tid)).one()
            assert s.get(AppKeyVersion, (key.id, 1)).encryptions == 0  # the backup forgot
        app = old.principals.authenticate(tokens["app"])
        assert old.transit.encrypt(app, "key-0", b"x")[1] == 2
    finally:
        restored_db.dispose()


def test_version_states(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    tid, c, _ = populate(kms, "states", volumes=0, keys=1)
    app, admin = c["app"], c["tenant-admin"]
    ct1, _ = kms.transit.encrypt(app, "key-0", b"one")
    kms.appkeys.rotate(admin, "key-0")
    ct2, v = kms.transit.encrypt(app, "key-0", b"two")
    assert v == 2 and kms.transit.decrypt(app, "key-0", ct1).reveal() == b"one"
    view = kms.appkeys.show(admin, "key-0").public()
    assert [x["state"] for x in view["versions"]] == ["deactivated", "active"]
    kms.appkeys.set_version_state(admin, "key-0", 1, "suspended")
    with pytest.raises(KeyVersionUnavailable):
        kms.transit.decrypt(app, "key-0", ct1)
    kms.appkeys.set_version_state(admin, "key-0", 1, "active")  # resume: decrypt only
    assert kms.appkeys.show(admin, "key-0").versions[0]["state"] == "deactivated"
    kms.appkeys.set_version_state(admin, "key-0", 1, "compromised")
    assert kms.appkeys.show(admin, "key-0").public()["rewrap_required"] is True
    with pytest.raises(KeyVersionUnavailable):
        kms.transit.decrypt(app, "key-0", ct1)
    rescued, v = kms.transit.rewrap(app, "key-0", ct1)
    assert v == 2 and kms.transit.decrypt(app, "key-0", rescued).reveal() == b"one"
    with pytest.raises(InvalidState):
        kms.appkeys.set_version_state(admin, "key-0", 1, "active")
    with pytest.raises(InvalidState):
        kms.appkeys.set_version_state(admin, "key-0", 2, "destroyed")  # the latest
    kms.appkeys.set_version_state(admin, "key-0", 1, "destroyed")
    with kms.db.read() as s:
        key = s.scalars(select(AppKey).where(AppKey.tenant_id == tid)).one()
        assert s.get(AppKeyVersion, (key.id, 1)).wrapped_key == b""
    for op in (kms.transit.decrypt, kms.transit.rewrap):
        with pytest.raises(KeyVersionUnavailable):
            op(app, "key-0", ct1)
    with pytest.raises(InvalidState):
        kms.appkeys.set_version_state(admin, "key-0", 1, "suspended")
    kms.appkeys.set_version_state(admin, "key-0", 2, "suspended")
    with pytest.raises(KeyVersionUnavailable):
        kms.transit.encrypt(app, "key-0", b"x")
    kms.appkeys.set_version_state(admin, "key-0", 2, "active")
    assert kms.transit.decrypt(app, "key-0", ct2).reveal() == b"two"
    transitions = [e["action"] for e in kms.audit_export(tenant_id=tid)
                   if e["action"].startswith("key.version_")]
    assert transitions == ["key.version_suspended", "key.version_deactivated",
                           "key.version_compromised", "key.version_destroyed",
                           "key.version_suspended", "key.version_active"]


def test_usage_separation(clocked) -> None:  # type: ignore[no-untyped-def]
    """Each key serves one purpose: the token refuses the others, and a blob of one kind
    does not unwrap as another."""
    kms, _ = clocked
    with kms.db.read() as s:
        service = {r.purpose: bytes.fromhex(r.cka_id) for r in s.scalars(select(ServiceKey))}
    iv = os.urandom(12)
    with pytest.raises(HsmKeyUsageRefused):
        kms.hsm.gcm_encrypt(service["audit-hmac"], b"x", iv=iv, aad=b"")
    with pytest.raises(HsmKeyUsageRefused):
        kms.hsm.hmac_sha256(service["secrets-kek"], b"x")
    with pytest.raises((HsmKeyUsageRefused, Exception)):
        kms.hsm.hmac_sha256(service["signing"], b"x")
    tid, c, _ = populate(kms, "separation", volumes=1, keys=1)
    with kms.db.write() as s:
        kek = s.scalars(select(Kek).where(Kek.tenant_id == tid)).one()
        with pytest.raises(HsmKeyUsageRefused):
            kms.hsm.hmac_sha256(bytes.fromhex(kek.cka_id), b"x")
        vol = s.get(Volume, (tid, "vol-0"))
        key = s.scalars(select(AppKey).where(AppKey.tenant_id == tid)).one()
        version = s.get(AppKeyVersion, (key.id, 1))
        vol.wrapped_key, version.wrapped_key = version.wrapped_key, vol.wrapped_key
    with pytest.raises(KeyIntegrityError):
        kms.volumes.fetch_key(c["hypervisor"], "vol-0")
    with pytest.raises(KeyIntegrityError):
        kms.transit.encrypt(c["app"], "key-0", b"x")


def _blobs_under_live_keks(kms: Kms, tid: str) -> None:
    with kms.db.read() as s:
        states = {k.generation: k.state for k in s.scalars(select(Kek).where(Kek.tenant_id == tid))}
        for v in s.scalars(select(Volume).where(Volume.tenant_id == tid)):
            assert states[v.kek_generation] != "destroyed"
        for row in s.scalars(select(AppKeyVersion).join(AppKey).where(AppKey.tenant_id == tid)):
            assert states[row.kek_generation] != "destroyed" or not row.wrapped_key


class Crash(BaseException):
    pass


@pytest.mark.parametrize("step", ["start", "rewrap", "destroy", "mid-rewrap"])
def test_kek_rotation_crash_at_each_step_is_completed(clocked, step) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    tid, c, _ = populate(kms, f"kek crash {step}", volumes=5, keys=2)
    keys = {f"vol-{i}": kms.volumes.fetch_key(c["hypervisor"], f"vol-{i}").key for i in range(5)}
    ct, _ = kms.transit.encrypt(c["app"], "key-1", b"kept")

    def crash(t: str, done: str) -> None:
        if done == step:
            raise Crash()

    crashing = KekRotation(db=kms.db, hsm=kms.hsm, keyring=kms.keyring, clock=clock,
                           audit=kms.audit, period=timedelta(days=90), after_step=crash)
    if step == "mid-rewrap":
        original, kr.BATCH = kr.BATCH, 2  # several batches; crash after the first commits
        calls = {"n": 0}
        real_move = crashing._move

        def move(*a: Any) -> bytes:
            calls["n"] += 1
            if calls["n"] == 3:
                raise Crash()
            return real_move(*a)

        crashing._move = move  # type: ignore[method-assign]
        try:
            with pytest.raises(Crash):
                crashing.rotate(tid)
        finally:
            kr.BATCH = original
    else:
        with pytest.raises(Crash):
            crashing.rotate(tid)
    _blobs_under_live_keks(kms, tid)
    result = kms.kek_rotation.rotate(tid)
    assert result.state == "rotated" and result.destroyed_generations == (1,)
    _blobs_under_live_keks(kms, tid)
    with kms.db.read() as s:
        gens = {k.generation: k.state for k in s.scalars(select(Kek).where(Kek.tenant_id == tid))}
    assert gens == {1: "destroyed", 2: "active"}
    assert kms.hsm.find_objects(label_prefix=f"kms/{tid}/kek/1") == []
    for vol, key in keys.items():
        assert kms.volumes.fetch_key(c["hypervisor"], vol).key == key
    assert kms.transit.decrypt(c["app"], "key-1", ct).reveal() == b"kept"


def test_old_kek_is_not_destroyed_while_referenced(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    tid, _, _ = populate(kms, "referenced", volumes=2, keys=0)
    with kms.db.read() as s:
        kek = s.scalars(select(Kek).where(Kek.tenant_id == tid)).one()
    with pytest.raises(KekStillReferenced):
        kms.kek_rotation.destroy_generation(tid, kek.generation, kek.cka_id)
    assert kms.hsm.find_objects(cka_id=bytes.fromhex(kek.cka_id))


def test_deleted_volume_is_erased_when_its_kek_is_destroyed(clocked, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """After DELETE and a KEK rotation, a database copy from before the deletion, beside
    the live token, no longer yields the volume key."""
    kms, clock = clocked
    tid, c, tokens = populate(kms, "single volume erasure", volumes=2, keys=0)
    original = kms.volumes.fetch_key(c["hypervisor"], "vol-0").key
    backup = tmp_path / "before-delete.sqlite3"
    with sqlite3.connect(str(kms.db.engine.url.database)) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    status = kms.volumes.delete(c["hypervisor"], "vol-0")
    assert status["erasure"]["status"] == "pending_kek_rotation"
    assert status["erasure"]["complete_by"] == (T0 + timedelta(days=90)).isoformat()
    # Before the rotation, the backup still yields the key: that is why it is "pending".
    early = Database(f"sqlite:///{shutil.copy(backup, tmp_path / 'early.sqlite3')}")
    try:
        # Copies of the session's database: they journal nothing (data-plane events off),
        # or the token's anchor would see the session's journal rolled back.
        k_early = Kms(db=early, hsm=kms.hsm, clock=clock,
                      options=KmsOptions(audit_data_plane=False))
        hv = k_early.principals.authenticate(tokens["hypervisor"])
        assert k_early.volumes.fetch_key(hv, "vol-0").key == original
    finally:
        early.dispose()
    kms.kek_rotation.rotate(tid)
    done = kms.volumes.status(c["hypervisor"], "vol-0")
    assert done["erasure"]["status"] == "complete"
    restored = Database(f"sqlite:///{backup}")
    try:
        k_old = Kms(db=restored, hsm=kms.hsm, clock=clock,
                    options=KmsOptions(audit_data_plane=False))
        hv = k_old.principals.authenticate(tokens["hypervisor"])
        with pytest.raises(KeyIntegrityError):
            k_old.volumes.fetch_key(hv, "vol-0")
    finally:
        restored.dispose()
    assert kms.volumes.fetch_key(c["hypervisor"], "vol-1").key_bits == 512


def test_kek_rotation_is_scheduled(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    tid, _, _ = populate(kms, "scheduled rotation", volumes=1, keys=0)
    assert tid not in kms.kek_rotation.due()
    clock.advance(timedelta(days=90))
    assert tid in kms.kek_rotation.due()
    results = {r.tenant_id: r for r in kms.kek_rotation.run_due()}
    assert results[tid].state == "rotated" and results[tid].active_generation == 2
    assert tid not in kms.kek_rotation.due()


# -- the state machine -----------------------------------------------------------------

def test_key_lifecycle_state_machine(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, _ = clocked
    counter = iter(range(10**6))

    class Lifecycle(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.tid, c, _ = populate(kms, f"lifecycle machine {next(counter)}", volumes=1,
                                      keys=1)
            self.app, self.admin = c["app"], c["tenant-admin"]
            self.latest, self.min, self.enabled = 1, 1, True
            self.states = {1: "active"}
            self.texts: list[tuple[str, bytes, int]] = []

        @precondition(lambda self: self.enabled and self.states[self.latest] == "active")
        @rule(data=st.binary(max_size=64))
        def encrypt(self, data: bytes) -> None:
            ct, v = kms.transit.encrypt(self.app, "key-0", data)
            assert v == self.latest
            self.texts.append((ct, data, v))

        @rule()
        def rotate(self) -> None:
            kms.appkeys.rotate(self.admin, "key-0")
            if self.states[self.latest] == "active":
                self.states[self.latest] = "deactivated"
            self.latest += 1
            self.states[self.latest] = "active"

        @precondition(lambda self: self.texts)
        @rule(i=st.integers(min_value=0))
        def rewrap(self, i: int) -> None:
            ct, data, v = self.texts[i % len(self.texts)]
            usable = (self.enabled and v >= self.min
                      and self.states[v] in ("active", "deactivated", "compromised")
                      and self.states[self.latest] == "active")
            try:
                new, nv = kms.transit.rewrap(self.app, "key-0", ct)
            except (KeyVersionUnavailable, KeyDisabled):
                assert not usable
                return
            assert usable and nv == self.latest
            # Short plaintexts occur in any base64 text by chance; a long one must not.
            assert len(data) < 12 or data not in new.encode()
            self.texts.append((new, data, nv))

        @rule(v=st.integers(min_value=1, max_value=8))
        def set_min(self, v: int) -> None:
            if v > self.latest:
                return
            kms.appkeys.update(self.admin, "key-0", min_decryption_version=v)
            self.min = v

        @rule(flag=st.booleans())
        def enable(self, flag: bool) -> None:
            kms.appkeys.update(self.admin, "key-0", enabled=flag)
            self.enabled = flag

        @rule(v=st.integers(min_value=1, max_value=8),
              state=st.sampled_from(["suspended", "active", "compromised", "destroyed"]))
        def version_state(self, v: int, state: str) -> None:
            if v > self.latest:
                return
            try:
                kms.appkeys.set_version_state(self.admin, "key-0", v, state)
            except InvalidState:
                return
            if state == "active":
                self.states[v] = "active" if v == self.latest else "deactivated"
            else:
                self.states[v] = state

        @rule()
        def rotate_kek(self) -> None:
            kms.kek_rotation.rotate(self.tid)

        @invariant()
        def every_ciphertext_decrypts_exactly_when_usable(self) -> None:
            for ct, data, v in self.texts:
                usable = (self.enabled and v >= self.min
                          and self.states[v] in ("active", "deactivated"))
                try:
                    got = kms.transit.decrypt(self.app, "key-0", ct).reveal()
                except (KeyVersionUnavailable, KeyDisabled):
                    assert not usable, (v, self.states, self.min, self.enabled)
                    continue
                assert usable and got == data

    Lifecycle.TestCase.settings = settings(
        max_examples=20, stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    Lifecycle.TestCase().runTest()


def test_usage_reservations_are_per_tenant(kms) -> None:  # type: ignore[no-untyped-def]
    """SQLite may reuse an erased tenant's key id: a reservation never crosses tenants."""
    from kms.usage import UsageLimiter

    limiter = UsageLimiter(hsm=kms.hsm, cap=100)
    limiter._ranges[("t-erased", 7, 1)] = [0, 4096]
    assert limiter.try_take_local("t-erased", 7, 1, 1)
    assert not limiter.try_take_local("t-new", 7, 1, 1)
    limiter.forget("t-erased")
    assert not limiter.try_take_local("t-erased", 7, 1, 1)
