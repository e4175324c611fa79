"""The PKCS#11 adapter against a real SoftHSM token."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11 import exceptions as p11e

from hsm import HsmAmbiguousKey, HsmDecryptFailed, HsmKeyNotFound


@pytest.fixture
def hsm(kms):  # type: ignore[no-untyped-def]
    return kms.hsm


def test_kek_is_sensitive_and_never_extractable(hsm) -> None:  # type: ignore[no-untyped-def]
    """A tenant KEK reads back sensitive, non-extractable, encrypt/decrypt only."""
    kek = hsm.generate_aes_kek(label="kms/t-attr/kek/1")
    attrs = hsm.key_attributes(kek)
    assert attrs["TOKEN"] and attrs["PRIVATE"] and attrs["SENSITIVE"]
    assert attrs["ALWAYS_SENSITIVE"] and attrs["NEVER_EXTRACTABLE"]
    assert not attrs["EXTRACTABLE"]
    assert attrs["ENCRYPT"] and attrs["DECRYPT"]
    for capability in ("WRAP", "UNWRAP", "SIGN", "VERIFY", "DERIVE"):
        assert not attrs[capability], capability
    hsm.destroy(kek)


def test_kek_value_cannot_be_read_or_wrapped_out(hsm) -> None:  # type: ignore[no-untyped-def]
    """Reading CKA_VALUE fails, and so does wrapping the KEK under another key."""
    kek = hsm.generate_aes_kek(label="kms/t-export/kek/1")

    def try_export(session):  # type: ignore[no-untyped-def]
        key = session.get_key(id=kek)
        with pytest.raises(p11e.AttributeSensitive):
            key[Attribute.VALUE]
        wrapper = session.generate_key(KeyType.AES, 256, store=False,
                                       mechanism=Mechanism.AES_KEY_GEN,
                                       template={Attribute.WRAP: True})
        with pytest.raises((p11e.KeyUnextractable, p11e.KeyNotWrappable)):
            wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP)
        wrapper.destroy()
        return True

    assert hsm._run(try_export)
    hsm.destroy(kek)


def test_gcm_round_trip_and_tamper(hsm) -> None:  # type: ignore[no-untyped-def]
    """AES-GCM in the token authenticates IV, AAD and every byte."""
    kek = hsm.generate_aes_kek(label="kms/t-gcm/kek/1")
    iv = os.urandom(12)
    sealed = hsm.gcm_encrypt(kek, b"k" * 64, iv=iv, aad=b"place")
    assert hsm.gcm_decrypt(kek, sealed, iv=iv, aad=b"place") == b"k" * 64
    with pytest.raises(HsmDecryptFailed):
        hsm.gcm_decrypt(kek, sealed, iv=iv, aad=b"other")
    with pytest.raises(HsmDecryptFailed):
        hsm.gcm_decrypt(kek, bytes([sealed[0] ^ 1]) + sealed[1:], iv=iv, aad=b"place")
    with pytest.raises(HsmDecryptFailed):
        hsm.gcm_decrypt(kek, sealed, iv=bytes(12), aad=b"place")
    with pytest.raises(ValueError):
        hsm.gcm_encrypt(kek, b"x", iv=b"short", aad=b"")
    hsm.destroy(kek)


def test_destroy_is_confirmed_by_fresh_search(hsm) -> None:  # type: ignore[no-untyped-def]
    """After destroy, neither CKA_ID nor label prefix finds the key; a second destroy is
    a no-op and using the key fails loudly."""
    kek = hsm.generate_aes_kek(label="kms/t-destroy/kek/1")
    assert hsm.find_objects(cka_id=kek)
    hsm.destroy(kek)
    assert hsm.find_objects(cka_id=kek) == []
    assert hsm.find_objects(label_prefix="kms/t-destroy/") == []
    hsm.destroy(kek)
    with pytest.raises(HsmKeyNotFound):
        hsm.gcm_encrypt(kek, b"x", iv=os.urandom(12), aad=b"")


def test_destroy_by_label_prefix_catches_orphans(hsm) -> None:  # type: ignore[no-untyped-def]
    """Objects known only by label (orphans) are found and destroyed by prefix."""
    a = hsm.generate_aes_kek(label="kms/t-orphan/kek/1")
    b = hsm.generate_aes_kek(label="kms/t-orphan/kek/2")
    keep = hsm.generate_aes_kek(label="kms/t-orphan2/kek/1")
    destroyed = hsm.destroy_by_label_prefix("kms/t-orphan/")
    assert sorted(o.cka_id for o in destroyed) == sorted([a, b])
    assert hsm.find_objects(cka_id=keep)
    hsm.destroy(keep)


def test_duplicate_cka_id_fails_loudly(hsm) -> None:  # type: ignore[no-untyped-def]
    """Two objects sharing a CKA_ID are never guessed between."""
    dup = os.urandom(16)

    def make_two(session):  # type: ignore[no-untyped-def]
        for n in (1, 2):
            session.generate_key(KeyType.AES, 256, id=dup, label=f"kms/t-dup/kek/{n}",
                                 store=True, mechanism=Mechanism.AES_KEY_GEN,
                                 template={Attribute.ENCRYPT: True, Attribute.DECRYPT: True})

    hsm._run(make_two, retry=False)
    with pytest.raises(HsmAmbiguousKey):
        hsm.gcm_encrypt(dup, b"x", iv=os.urandom(12), aad=b"")
    hsm.destroy(dup)
    assert hsm.find_objects(cka_id=dup) == []


def test_recovers_from_a_lost_session(hsm) -> None:  # type: ignore[no-untyped-def]
    """A session closed underneath the adapter is re-opened, keys found again by CKA_ID."""
    kek = hsm.generate_aes_kek(label="kms/t-lost/kek/1")
    iv = os.urandom(12)
    sealed = hsm.gcm_encrypt(kek, b"secret", iv=iv, aad=b"")
    with hsm.exclusive():
        hsm._session.close()  # the token forgets the session; our handle is now invalid
    assert hsm.gcm_decrypt(kek, sealed, iv=iv, aad=b"") == b"secret"
    hsm.destroy(kek)


def test_works_in_a_forked_child(hsm) -> None:  # type: ignore[no-untyped-def]
    """After fork() the child re-initialises the library instead of reusing handles."""
    kek = hsm.generate_aes_kek(label="kms/t-fork/kek/1")
    iv = os.urandom(12)
    sealed = hsm.gcm_encrypt(kek, b"fork", iv=iv, aad=b"")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            ok = hsm.gcm_decrypt(kek, sealed, iv=iv, aad=b"") == b"fork"
        except BaseException:
            ok = False
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert hsm.gcm_decrypt(kek, sealed, iv=iv, aad=b"") == b"fork"
    hsm.destroy(kek)


def test_concurrent_callers_are_serialized(hsm) -> None:  # type: ignore[no-untyped-def]
    """Eight threads calling the token at once neither crash nor corrupt results."""
    kek = hsm.generate_aes_kek(label="kms/t-threads/kek/1")
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(100):
                iv = os.urandom(12)
                msg = f"{n}-{i}".encode()
                sealed = hsm.gcm_encrypt(kek, msg, iv=iv, aad=msg)
                assert hsm.gcm_decrypt(kek, sealed, iv=iv, aad=msg) == msg
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    hsm.destroy(kek)


def test_self_test_and_token_info(hsm) -> None:  # type: ignore[no-untyped-def]
    """The self-test passes on SoftHSM and leaves no object behind. Counters (DATA
    objects: journal anchors, usage high-water marks) are left out of the comparison:
    background threads of other tests' services rewrite them at any time (a destroy and a
    create), and the self-test makes keys only."""

    def keys() -> set[Any]:
        return {o for o in hsm.find_objects(label_prefix="") if o.object_class != "DATA"}

    before = keys()
    hsm.self_test()
    assert keys() == before
    info = hsm.token_info()
    assert info.label == "kms" and info.model and info.serial


def test_signature_verifies_with_cryptography(hsm) -> None:  # type: ignore[no-untyped-def]
    """ECDSA P-256 signatures from the token are DER and verify with the public key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    key = hsm.generate_signing_key(label="kms/t-sign/signing")
    sig = hsm.sign_p256(key, b"document")
    pub = load_der_public_key(hsm.public_key_der(key))
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"document", ec.ECDSA(hashes.SHA256()))
    hsm.destroy(key)
    assert hsm.find_objects(cka_id=key) == []


def test_repr_reveals_no_pin(hsm, kms_home) -> None:  # type: ignore[no-untyped-def]
    pin = (kms_home / "secrets" / "user.pin").read_text().strip()
    assert pin not in repr(hsm)


def test_a_reinitialisation_by_another_adapter_does_not_fail_the_next_call(kms, settings) -> None:  # type: ignore[no-untyped-def]
    """C_Finalize/C_Initialize by one adapter of the process invalidates every session;
    the others notice the new generation and reopen before a non-retried call."""
    from cli.wiring import build_kms
    from hsm.adapter import _LibState

    other = build_kms(settings)
    try:
        other.hsm.token_info()
        kms.hsm.token_info()
        _LibState.reset(other.hsm._module_path, other.hsm._generation)
        kek = kms.hsm.generate_aes_kek(label="kms/t-regen/kek/1")  # never retried
        assert kms.hsm.find_objects(cka_id=kek)
        kms.hsm.destroy(kek)
    finally:
        other.db.dispose()


def test_an_unwrap_that_fails_on_a_stale_view_of_the_key_reads_the_token_again(
        hsm) -> None:  # type: ignore[no-untyped-def]
    """A break-it trial saw every unwrap under a KEK that `kms tenant rotate-kek` (another
    process) had just made fail in the server until the next rotation: SoftHSM's copy of
    the object in that process was not the key. Fault injection on the real adapter: the
    handle it holds for the KEK is another AES key of the token (a stale view). The
    failed decrypt reads the token again and succeeds; a damaged blob still fails."""
    from pkcs11 import ObjectClass

    kek = hsm.generate_aes_kek(label="kms/t-stale/kek/1")
    other = hsm.generate_aes_kek(label="kms/t-stale/kek/2")
    iv = os.urandom(12)
    sealed = hsm.gcm_encrypt(kek, b"v" * 64, iv=iv, aad=b"place")

    def stale(session):  # type: ignore[no-untyped-def]
        wrong = hsm._find_one(session, other, ObjectClass.SECRET_KEY)
        hsm._handles[(kek, int(ObjectClass.SECRET_KEY))] = wrong

    hsm._run(stale)
    assert hsm.gcm_decrypt(kek, sealed, iv=iv, aad=b"place") == b"v" * 64
    hsm._run(stale)
    with pytest.raises(HsmDecryptFailed):
        hsm.gcm_decrypt(kek, sealed, iv=iv, aad=b"another place")
    hsm.destroy(kek)
    hsm.destroy(other)


def test_a_key_fetch_on_a_stale_view_of_the_kek_is_answered(client, tenant, kms) -> None:  # type: ignore[no-untyped-def]
    """The same through the API: the fetch runs inline on the event loop, the failed
    unwrap is tried again off it after the token is read again, and the key is served."""
    from pkcs11 import ObjectClass
    from sqlalchemy import select

    from kms.models import Kek

    hv = tenant.auth("hypervisor")
    assert client.post("/v1/volumes", json={"volume_id": "vol-stale"}, headers=hv).status_code \
        == 201
    with kms.db.read() as s:
        cka_id = bytes.fromhex(s.scalars(select(Kek.cka_id).where(
            Kek.tenant_id == tenant.id, Kek.state == "active")).one())
    other = kms.hsm.generate_aes_kek(label="kms/t-stale-api/kek/1")

    def stale(session):  # type: ignore[no-untyped-def]
        wrong = kms.hsm._find_one(session, other, ObjectClass.SECRET_KEY)
        kms.hsm._handles[(cka_id, int(ObjectClass.SECRET_KEY))] = wrong

    kms.hsm._run(stale)
    r = client.post("/v1/volumes/vol-stale/key", headers=hv)
    assert r.status_code == 200, r.text
    kms.hsm.destroy(other)
