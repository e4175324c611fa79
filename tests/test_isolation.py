"""Tenant isolation and roles: another tenant's objects are indistinguishable from
objects that do not exist; roles gate what a token may do."""

from __future__ import annotations

import base64

import pytest


@pytest.fixture(scope="module")
def two_tenants(client, new_tenant):  # type: ignore[no-untyped-def]
    a, b = new_tenant(), new_tenant()
    for t in (a, b):
        assert client.post("/v1/volumes", json={"volume_id": f"vol-{t.id}"},
                           headers=t.auth("hypervisor")).status_code == 201
        assert client.post("/v1/keys", json={"name": f"key-{t.id}"},
                           headers=t.auth("tenant-admin")).status_code == 201
    return a, b


def _requests(vol: str, key: str, ct: str) -> list[tuple[str, str, str, dict | None]]:
    return [
        ("hypervisor", "POST", f"/v1/volumes/{vol}/key", None),
        ("hypervisor", "DELETE", f"/v1/volumes/{vol}", None),
        ("tenant-admin", "GET", f"/v1/keys/{key}", None),
        ("app", "GET", f"/v1/keys/{key}", None),
        ("app", "POST", f"/v1/keys/{key}/encrypt", {"plaintext": "aGk="}),
        ("app", "POST", f"/v1/keys/{key}/decrypt", {"ciphertext": ct}),
        ("app", "POST", f"/v1/keys/{key}/datakey", {"bits": 256}),
    ]


def test_other_tenants_objects_answer_exactly_like_missing_ones(client, two_tenants) -> None:  # type: ignore[no-untyped-def]
    """For every volume and key route, B's object seen by A answers byte for byte what a
    name that exists nowhere answers."""
    a, b = two_tenants
    ct = client.post(f"/v1/keys/key-{b.id}/encrypt", json={"plaintext": "aGk="},
                     headers=b.auth("app")).json()["ciphertext"]
    for (role, method, path, body), (_, _, missing_path, _) in zip(
            _requests(f"vol-{b.id}", f"key-{b.id}", ct),
            _requests("vol-nowhere", "key-nowhere", ct)):
        theirs = client.request(method, path, json=body, headers=a.auth(role))
        missing = client.request(method, missing_path, json=body, headers=a.auth(role))
        assert theirs.status_code == 404, (method, path, theirs.text)
        assert theirs.json() == missing.json()
        assert theirs.headers["content-type"] == missing.headers["content-type"]
    # and B's objects are untouched
    assert client.post(f"/v1/volumes/vol-{b.id}/key",
                       headers=b.auth("hypervisor")).status_code == 200
    listed = client.get("/v1/volumes", headers=a.auth("hypervisor")).json()["volumes"]
    assert [v["volume_id"] for v in listed] == [f"vol-{a.id}"]
    keys = client.get("/v1/keys", headers=a.auth("app")).json()["keys"]
    assert [k["name"] for k in keys] == [f"key-{a.id}"]


def test_a_tenant_cannot_create_over_another_tenants_name(client, two_tenants) -> None:  # type: ignore[no-untyped-def]
    """Volume ids and key names are per tenant: the same id in A does not collide with B."""
    a, b = two_tenants
    r = client.post("/v1/volumes", json={"volume_id": f"vol-{b.id}"}, headers=a.auth("hypervisor"))
    assert r.status_code == 201
    ka = client.post(f"/v1/volumes/vol-{b.id}/key", headers=a.auth("hypervisor")).json()["key"]
    kb = client.post(f"/v1/volumes/vol-{b.id}/key", headers=b.auth("hypervisor")).json()["key"]
    assert ka != kb


ROLE_MATRIX = [
    # (method, path, body, allowed roles)
    ("POST", "/v1/volumes", {"volume_id": "rm-{n}"}, {"hypervisor"}),
    ("GET", "/v1/volumes", None, {"hypervisor"}),
    ("POST", "/v1/volumes/{vol}/key", None, {"hypervisor"}),
    ("POST", "/v1/keys", {"name": "rm-{n}"}, {"tenant-admin"}),
    ("GET", "/v1/keys", None, {"tenant-admin", "app"}),
    ("GET", "/v1/keys/{key}", None, {"tenant-admin", "app"}),
    ("POST", "/v1/keys/{key}/encrypt", {"plaintext": "aGk="}, {"app"}),
    ("POST", "/v1/keys/{key}/datakey", {"bits": 256}, {"app"}),
    ("GET", "/v1/tenant", None, {"tenant-admin", "hypervisor", "app"}),
    ("GET", "/v1/tenant/audit", None, {"tenant-admin"}),
    ("GET", "/v1/volumes/{vol}", None, {"hypervisor"}),
    ("POST", "/v1/keys/{key}/rotate", None, {"tenant-admin"}),
    ("PATCH", "/v1/keys/{key}", {"enabled": True}, {"tenant-admin"}),
    ("PATCH", "/v1/keys/{key}/versions/1", {"state": "active"}, {"tenant-admin"}),
    ("POST", "/v1/keys/{key}/encrypt", {"batch": [{"plaintext": "aGk="}]}, {"app"}),
    ("DELETE", "/v1/volumes/{vol}", None, {"hypervisor"}),
]


def test_role_matrix(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """Each role gets a success exactly where allowed, 403 `forbidden` elsewhere; no token
    or a bad token gets 401."""
    vol, key = "matrix-vol", "matrix-key"
    assert client.post("/v1/volumes", json={"volume_id": vol},
                       headers=tenant.auth("hypervisor")).status_code == 201
    assert client.post("/v1/keys", json={"name": key},
                       headers=tenant.auth("tenant-admin")).status_code == 201
    n = 0
    for method, path_t, body_t, allowed in ROLE_MATRIX:
        for role in ("tenant-admin", "hypervisor", "app"):
            n += 1
            path = path_t.format(vol=vol, key=key)
            body = {k: (v.format(n=n) if isinstance(v, str) else v)
                    for k, v in (body_t or {}).items()} or None
            r = client.request(method, path, json=body, headers=tenant.auth(role))
            if role in allowed:
                assert r.status_code < 300, (method, path, role, r.text)
            else:
                assert r.status_code == 403 and r.json()["code"] == "forbidden", \
                    (method, path, role, r.text)
        for headers in ({}, {"Authorization": "Bearer nope"},
                        {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()},
                        {"Authorization": tenant.auth("app")["Authorization"] + "x"}):
            r = client.request(method, path_t.format(vol=vol, key=key), json=body_t,
                               headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
            assert r.headers["www-authenticate"] == "Bearer"


def test_volume_listing_never_carries_key_material(client, tenant) -> None:  # type: ignore[no-untyped-def]
    h = tenant.auth("hypervisor")
    client.post("/v1/volumes", json={"volume_id": "listed"}, headers=h)
    key = client.post("/v1/volumes/listed/key", headers=h).json()["key"]
    listing = client.get("/v1/volumes", headers=h).text
    raw = base64.b64decode(key)
    assert key not in listing and raw.hex() not in listing
    assert set(client.get("/v1/volumes", headers=h).json()["volumes"][0]) == \
        {"volume_id", "cipher", "key_bits", "created_at"}


def test_revoked_and_operator_credentials_are_refused_everywhere(client, kms, tenant) -> None:  # type: ignore[no-untyped-def]
    """Every tenant-API route answers 401 to a revoked principal's token and to an operator
    session token (operator credentials are not tenant credentials, 9.6 b-d)."""
    from urllib.parse import parse_qs, urlparse

    import pyotp

    client.post("/v1/volumes", json={"volume_id": "rv"}, headers=tenant.auth("hypervisor"))
    client.post("/v1/keys", json={"name": "rk"}, headers=tenant.auth("tenant-admin"))
    revoked = {}
    for role in ("tenant-admin", "hypervisor", "app"):
        issued = kms.principals.create(tenant_id=tenant.id, role=role, name=f"gone-{role}")
        kms.principals.revoke(issued.principal_id)
        revoked[role] = issued.token
    new = kms.operators.create(f"matrix-op-{tenant.id}", "operator passphrase 1")
    seed = parse_qs(urlparse(new.totp_uri).query)["secret"][0]
    session = kms.operators.login(new.username, "operator passphrase 1",
                                  pyotp.TOTP(seed).at(kms.clock.now()))
    for method, path_t, body_t, allowed in ROLE_MATRIX:
        path = path_t.format(vol="rv", key="rk")
        body = {k: (v.format(n="x") if isinstance(v, str) else v)
                for k, v in (body_t or {}).items()} or None
        for role in allowed:
            r = client.request(method, path, json=body,
                               headers={"Authorization": f"Bearer {revoked[role]}"})
            assert r.status_code == 401, (method, path, role, r.text)
        r = client.request(method, path, json=body,
                           headers={"Authorization": f"Bearer {session.token}"})
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated", (method, path)
    # the live principals still work: nothing above changed state
    assert client.post("/v1/volumes/rv/key", headers=tenant.auth("hypervisor")).status_code == 200


def test_another_tenants_token_gets_404_on_every_object_route(client, two_tenants) -> None:  # type: ignore[no-untyped-def]
    a, b = two_tenants
    for method, path_t, body_t, allowed in ROLE_MATRIX:
        if "{vol}" not in path_t and "{key}" not in path_t:
            continue
        path = path_t.format(vol=f"vol-{a.id}", key=f"key-{a.id}")
        for role in allowed:
            r = client.request(method, path, json=body_t, headers=b.auth(role))
            assert r.status_code == 404 and r.json()["code"] == "not_found", (method, path, role)
