"""Application keys over the tenant API: round trips, and every way a ciphertext can be
wrong answers one opaque 400 `decryption_failed`."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from kms.models import AppKey, AppKeyVersion

b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
HYP = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module")
def keyed_tenant(client, new_tenant):  # type: ignore[no-untyped-def]
    """One tenant with key `k1`, shared by the property tests of this module."""
    tenant = new_tenant()
    make_key(client, tenant)
    return tenant


def make_key(client, tenant, name: str = "k1") -> None:  # type: ignore[no-untyped-def]
    r = client.post("/v1/keys", json={"name": name, "type": "aes256-gcm"},
                    headers=tenant.auth("tenant-admin"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == name and body["latest_version"] == 1
    assert body["min_decryption_version"] == 1 and "created_at" in body


def enc(client, tenant, name, pt: bytes, ctx: bytes | None = None):  # type: ignore[no-untyped-def]
    body = {"plaintext": b64(pt)}
    if ctx is not None:
        body["context"] = b64(ctx)
    return client.post(f"/v1/keys/{name}/encrypt", json=body, headers=tenant.auth("app"))


def dec(client, tenant, name, ct: str, ctx: bytes | None = None):  # type: ignore[no-untyped-def]
    body = {"ciphertext": ct}
    if ctx is not None:
        body["context"] = b64(ctx)
    return client.post(f"/v1/keys/{name}/decrypt", json=body, headers=tenant.auth("app"))


def assert_decryption_failed(r) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "decryption_failed"


@HYP
@given(pt=st.binary(max_size=2048), ctx=st.one_of(st.none(), st.binary(max_size=256)))
def test_round_trip_any_bytes_any_context(client, keyed_tenant, pt, ctx) -> None:  # type: ignore[no-untyped-def]
    """encrypt then decrypt returns the plaintext, for any bytes and any context."""
    tenant = keyed_tenant
    r = enc(client, tenant, "k1", pt, ctx)
    assert r.status_code == 200, r.text
    ct = r.json()["ciphertext"]
    assert ct.startswith("kms:v1:") and r.json()["key_version"] == 1
    r = dec(client, tenant, "k1", ct, ctx)
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["plaintext"]) == pt


@HYP
@given(data=st.data())
def test_any_bit_flip_fails(client, keyed_tenant, data) -> None:  # type: ignore[no-untyped-def]
    """Flipping any single bit of the binary ciphertext gives decryption_failed."""
    tenant = keyed_tenant
    pt = data.draw(st.binary(min_size=0, max_size=64))
    ct = enc(client, tenant, "k1", pt, b"ctx").json()["ciphertext"]
    blob = bytearray(base64.b64decode(ct.split(":", 2)[2]))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    assert_decryption_failed(dec(client, tenant, "k1", "kms:v1:" + b64(bytes(blob)), b"ctx"))


def test_truncated_and_malformed_ciphertexts_fail_alike(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """Truncation, bad base64, unknown versions and junk all give the same answer."""
    make_key(client, tenant)
    ct = enc(client, tenant, "k1", b"hello").json()["ciphertext"]
    body = ct.split(":", 2)[2]
    raw = base64.b64decode(body)
    for bad in ("kms:v1:" + b64(raw[:-1]), "kms:v1:" + b64(raw[:27]), "kms:v1:" + body[:-4],
                "kms:v2:" + body, "kms:v0:" + body, "kms:v1:" + body + "!", "junk", "",
                "kms:v99999999999:" + body, ct.replace("kms:", "KMS:")):
        assert_decryption_failed(dec(client, tenant, "k1", bad))


def test_only_the_canonical_spelling_of_a_ciphertext_decrypts(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """A break-it trial's note: base64 whose last character sets unused low bits
    (`aGVsbG9=` for `aGVsbG8=`) decoded to the same bytes, so one ciphertext could be
    written several ways. Only the spelling the service wrote decrypts."""
    import string

    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
    make_key(client, tenant)
    ct = enc(client, tenant, "k1", b"abcd").json()["ciphertext"]  # 32 bytes: one "="
    assert ct.endswith("=") and not ct.endswith("==")
    last = ct[-2]
    other = alphabet[alphabet.index(last) ^ 1]  # the same 4 high bits, another low bit
    assert base64.b64decode(ct[7:-2] + other + "=") == base64.b64decode(ct[7:])
    assert dec(client, tenant, "k1", ct).status_code == 200
    assert_decryption_failed(dec(client, tenant, "k1", ct[:-2] + other + "="))


def test_only_the_canonical_spelling_of_a_context_is_taken(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """The same for contexts (a second break-it trial): "aGl=" is b"hi" too, but only
    "aGk=" is taken, on every route that takes one, single or batch."""
    app = tenant.auth("app")
    make_key(client, tenant)
    ct = enc(client, tenant, "k1", b"data", b"hi").json()["ciphertext"]
    calls = (("encrypt", {"plaintext": "eA==", "context": "aGl="}, "context"),
             ("encrypt", {"batch": [{"plaintext": "eA==", "context": "aGl="}]},
              "batch.0.context"),
             ("decrypt", {"ciphertext": ct, "context": "aGl="}, "context"),
             ("decrypt", {"batch": [{"ciphertext": ct, "context": "aGl="}]}, "batch.0.context"),
             ("rewrap", {"ciphertext": ct, "context": "aGl="}, "context"),
             ("datakey", {"bits": 256, "context": "aGl="}, "context"))
    for route, body, field in calls:
        r = client.post(f"/v1/keys/k1/{route}", json=body, headers=app)
        assert r.status_code == 400 and r.json()["field"] == field, (route, r.text)
    assert dec(client, tenant, "k1", ct, b"hi").json()["plaintext"] == b64(b"data")


def test_wrong_context_fails(client, tenant) -> None:  # type: ignore[no-untyped-def]
    make_key(client, tenant)
    ct = enc(client, tenant, "k1", b"data", b"volume=1").json()["ciphertext"]
    assert dec(client, tenant, "k1", ct, b"volume=1").status_code == 200
    assert_decryption_failed(dec(client, tenant, "k1", ct, b"volume=2"))
    assert_decryption_failed(dec(client, tenant, "k1", ct))


def test_other_key_and_other_tenant_fail(client, new_tenant) -> None:  # type: ignore[no-untyped-def]
    """A ciphertext presented under another key, or to another tenant's key of the same
    name, does not decrypt."""
    a, b = new_tenant(), new_tenant()
    make_key(client, a, "k1")
    make_key(client, a, "k2")
    make_key(client, b, "k1")
    ct = enc(client, a, "k1", b"tenant A data").json()["ciphertext"]
    assert_decryption_failed(dec(client, a, "k2", ct))
    assert_decryption_failed(dec(client, b, "k1", ct))


def test_datakey(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """A data key comes back in plaintext and under the key; the ciphertext decrypts to it."""
    make_key(client, tenant)
    r = client.post("/v1/keys/k1/datakey", json={"bits": 256, "context": b64(b"c")},
                    headers=tenant.auth("app"))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    plain = base64.b64decode(r.json()["plaintext"])
    assert len(plain) == 32
    r2 = dec(client, tenant, "k1", r.json()["ciphertext"], b"c")
    assert base64.b64decode(r2.json()["plaintext"]) == plain
    r3 = client.post("/v1/keys/k1/datakey", json={"bits": 100}, headers=tenant.auth("app"))
    assert r3.status_code == 400 and r3.json()["code"] == "invalid_request"


def test_wrapped_key_copied_to_another_row_does_not_unwrap(client, new_tenant, settings) -> None:  # type: ignore[no-untyped-def]
    """A wrapped blob moved in the database to another tenant's or key's row fails to
    unwrap (its AAD names tenant, key and version); the service answers without it."""
    from cli.wiring import build_kms

    a, b = new_tenant(), new_tenant()
    make_key(client, a, "src")
    make_key(client, a, "other")
    make_key(client, b, "victim")
    # A fresh service (empty key cache) so that every use goes through the token.
    fresh = build_kms(settings)
    try:
        with fresh.db.write() as s:
            def version_row(tenant_id: str, name: str) -> AppKeyVersion:
                key = s.scalars(select(AppKey).where(AppKey.tenant_id == tenant_id,
                                                     AppKey.name == name)).one()
                return s.get(AppKeyVersion, (key.id, 1))
            src = version_row(a.id, "src")
            for row in (version_row(b.id, "victim"), version_row(a.id, "other")):
                row.wrapped_key = src.wrapped_key
                row.kek_generation = src.kek_generation
        from fastapi.testclient import TestClient

        from api.app import create_app

        with TestClient(create_app(settings, fresh), raise_server_exceptions=False) as c2:
            for tenant, name in ((b, "victim"), (a, "other")):
                r = enc(c2, tenant, name, b"x")
                assert r.status_code == 500, r.text
                assert r.json()["code"] == "key_integrity_error"
            assert enc(c2, a, "src", b"x").status_code == 200
    finally:
        fresh.db.dispose()


def test_key_metadata_and_conflicts(client, tenant) -> None:  # type: ignore[no-untyped-def]
    make_key(client, tenant, "meta")
    admin = tenant.auth("tenant-admin")
    r = client.post("/v1/keys", json={"name": "meta"}, headers=admin)
    assert r.status_code == 409 and r.json()["code"] == "already_exists"
    for headers in (admin, tenant.auth("app")):
        assert client.get("/v1/keys/meta", headers=headers).json()["name"] == "meta"
        names = [k["name"] for k in client.get("/v1/keys", headers=headers).json()["keys"]]
        assert names == ["meta"]
    r = client.post("/v1/keys", json={"name": "bad", "type": "des"}, headers=admin)
    assert r.status_code == 400 and r.json()["field"] == "type"
    body = client.get("/v1/keys/meta", headers=admin).text
    assert "wrapped" not in body and "key\"" not in body
