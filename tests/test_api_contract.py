"""The tenant API's contract: shapes, problems in French and English, limits."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st


def test_health_and_ready(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["token"] and r.json()["database"]


def test_openapi_documents_every_route_once(client, settings, kms) -> None:  # type: ignore[no-untyped-def]
    """Both apps describe their whole router (the routes sit on the app's own router:
    api.app._add_routes), every path and method of it and nothing else."""
    from fastapi.testclient import TestClient

    from api.admin_routes import router as admin_router
    from api.app import create_admin_app
    from api.tenant_routes import router as tenant_router

    admin = TestClient(create_admin_app(settings, kms))
    for c, url, router in ((client, "/v1/openapi.json", tenant_router),
                           (admin, "/admin/v1/openapi.json", admin_router)):
        paths = c.get(url).json()["paths"]
        want = {(r.path, m.lower()) for r in router.routes for m in r.methods}
        got = {(p, m) for p, ops in paths.items() for m in ops}
        assert want == got and len(want) > 5


def test_volume_lifecycle(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """Create → 201 with the contract's fields; again → 409; key → 512 bits; delete → 204;
    then the key answers 404."""
    h = tenant.auth("hypervisor")
    r = client.post("/v1/volumes", json={"volume_id": "vol-a", "cipher": "aes-xts-plain64",
                                         "key_bits": 512}, headers=h)
    assert r.status_code == 201
    assert set(r.json()) == {"volume_id", "cipher", "key_bits", "created_at"}
    assert r.json()["created_at"].endswith("+00:00")
    again = client.post("/v1/volumes", json={"volume_id": "vol-a"}, headers=h)
    assert again.status_code == 409 and again.json()["code"] == "already_exists"
    k1 = client.post("/v1/volumes/vol-a/key", headers=h)
    assert k1.status_code == 200 and k1.headers["cache-control"] == "no-store"
    assert len(base64.b64decode(k1.json()["key"])) == 64
    assert client.post("/v1/volumes/vol-a/key", headers=h).json()["key"] == k1.json()["key"]
    small = client.post("/v1/volumes", json={"volume_id": "vol-256", "key_bits": 256}, headers=h)
    assert small.status_code == 201
    assert len(base64.b64decode(client.post("/v1/volumes/vol-256/key",
                                            headers=h).json()["key"])) == 32
    assert client.delete("/v1/volumes/vol-a", headers=h).status_code == 204
    gone = client.post("/v1/volumes/vol-a/key", headers=h)
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"
    assert client.delete("/v1/volumes/vol-a", headers=h).status_code == 404


@pytest.mark.parametrize("body,field", [
    ({"volume_id": "a/b"}, "volume_id"),
    ({"volume_id": "../etc"}, "volume_id"),
    ({"volume_id": ""}, "volume_id"),
    ({"volume_id": "x" * 129}, "volume_id"),
    ({"volume_id": "é"}, "volume_id"),
    ({"volume_id": "ok", "cipher": "aes-cbc"}, "cipher"),
    ({"volume_id": "ok", "key_bits": 128}, "key_bits"),
    ({"volume_id": "ok", "key_bits": "lots"}, "key_bits"),
    ({"volume_id": "ok", "extra": 1}, "extra"),
    ({}, "volume_id"),
])
def test_bad_volume_input_is_400_and_changes_nothing(client, tenant, body, field) -> None:  # type: ignore[no-untyped-def]
    h = tenant.auth("hypervisor")
    r = client.post("/v1/volumes", json=body, headers=h)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_request" and r.json()["field"] == field
    assert client.get("/v1/volumes", headers=h).json()["volumes"] == []


def test_problem_documents_french_by_default_english_on_request(client, tenant) -> None:  # type: ignore[no-untyped-def]
    h = tenant.auth("hypervisor")
    fr = client.post("/v1/volumes/none/key", headers=h)
    en = client.post("/v1/volumes/none/key", headers={**h, "Accept-Language": "en-GB,en;q=0.9"})
    both = client.post("/v1/volumes/none/key",
                       headers={**h, "Accept-Language": "en;q=0.5, fr;q=0.8"})
    assert fr.headers["content-type"] == "application/problem+json"
    for r in (fr, en, both):
        body = r.json()
        assert set(body) >= {"type", "title", "status", "detail", "code"}
        assert body["status"] == 404 and body["code"] == "not_found"
    assert fr.json()["title"] == "Introuvable" and fr.headers["content-language"] == "fr"
    assert en.json()["title"] == "Not found" and en.headers["content-language"] == "en"
    assert both.json()["title"] == "Introuvable"


def test_invalid_json_and_base64_are_400(client, tenant) -> None:  # type: ignore[no-untyped-def]
    h = {**tenant.auth("app"), "content-type": "application/json"}
    client.post("/v1/keys", json={"name": "b64"}, headers=tenant.auth("tenant-admin"))
    r = client.post("/v1/keys/b64/encrypt", content=b'{"plaintext": ', headers=h)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    r = client.post("/v1/keys/b64/encrypt", json={"plaintext": "not base64!"}, headers=h)
    assert r.status_code == 400 and r.json()["field"] == "plaintext"
    r = client.post("/v1/keys/b64/encrypt", json={"plaintext": "aGk=", "context": "%%"},
                    headers=h)
    assert r.status_code == 400 and r.json()["field"] == "context"
    r = client.post("/v1/keys/b64/encrypt", json={"plaintext": "aGk="}, headers=h)
    assert r.status_code == 200


def test_invalid_error_detail_never_echoes_input(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """A rejected body's content (maybe plaintext) is not reflected in the problem."""
    marker = "SECRET-MARKER-4242"
    r = client.post("/v1/keys/x/encrypt", json={"plaintext": 5, "note": marker},
                    headers=tenant.auth("app"))
    assert r.status_code == 400 and marker not in r.text


def test_oversized_body_is_413_before_it_is_read(client, tenant, settings) -> None:  # type: ignore[no-untyped-def]
    """Bodies over the configured limit are refused with 413, declared or streamed."""
    h = tenant.auth("hypervisor")
    big = b'{"volume_id":"big","pad":"' + b"a" * settings.max_request_bytes + b'"}'
    r = client.post("/v1/volumes", content=big, headers={**h, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"volume_id":"big2","pad":"'
        for _ in range(settings.max_request_bytes // 4096 + 2):
            yield b"a" * 4096
        yield b'"}'

    r = client.post("/v1/volumes", content=chunks(),
                    headers={**h, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert client.get("/v1/volumes", headers=h).json()["volumes"] == []


def test_unknown_route_and_method_are_problems(client, tenant) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/v1/nothing", headers=tenant.auth("app"))
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = client.put("/v1/volumes", headers=tenant.auth("hypervisor"))
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


def test_get_tenant(client, tenant) -> None:  # type: ignore[no-untyped-def]
    for role in ("tenant-admin", "hypervisor", "app"):
        body = client.get("/v1/tenant", headers=tenant.auth(role)).json()
        assert body == {"id": tenant.id, "name": body["name"], "status": "active",
                        "notice": None}


def test_every_domain_error_code_has_a_problem_in_both_languages() -> None:
    """No domain error can fall through to a generic 500 for want of a mapping."""
    import kms.errors as errors
    from api.problems import _PROBLEMS

    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.KmsError)}
    assert codes <= set(_PROBLEMS), codes - set(_PROBLEMS)
    for status, fr, en in _PROBLEMS.values():
        assert 400 <= status < 600 and all(fr) and all(en) and fr != en


def test_tenant_audit_export_over_the_api(client, new_tenant) -> None:  # type: ignore[no-untyped-def]
    """A tenant-admin reads its own events as JSON lines, with actor, source and the
    request id it sent; other roles may not; another tenant's events never appear."""
    import json

    a, b = new_tenant(), new_tenant()
    r = client.post("/v1/volumes", json={"volume_id": "audited"},
                    headers={**a.auth("hypervisor"), "X-Request-Id": "req-42"})
    assert r.status_code == 201 and r.headers["x-request-id"] == "req-42"
    client.post("/v1/volumes/audited/key", headers=a.auth("hypervisor"))
    client.post("/v1/volumes", json={"volume_id": "other"}, headers=b.auth("hypervisor"))
    r = client.get("/v1/tenant/audit", headers=a.auth("tenant-admin"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines and all(e["tenant"] == a.id for e in lines)
    created = [e for e in lines if e["action"] == "volume.create"][0]
    assert created["request_id"] == "req-42" and created["source"] == "testclient"
    assert created["actor"].startswith("principal:p-") and created["object"] == "volume:audited"
    assert any(e["action"] == "volume.key_fetch" for e in lines)
    assert b.id not in r.text
    assert client.get("/v1/tenant/audit", headers=a.auth("app")).status_code == 403
    since = client.get("/v1/tenant/audit?since=2999-01-01T00:00:00%2B00:00",
                       headers=a.auth("tenant-admin"))
    assert since.status_code == 200 and since.text == ""
    naive = client.get("/v1/tenant/audit?since=2026-01-01T00:00:00",
                       headers=a.auth("tenant-admin"))
    assert naive.status_code == 400


def test_key_lifecycle_over_the_api(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """rotate, PATCH, version states, rewrap, batches and wrapped-only data keys."""
    import base64

    admin, app = tenant.auth("tenant-admin"), tenant.auth("app")
    assert client.post("/v1/keys", json={"name": "lc"}, headers=admin).status_code == 201
    ct1 = client.post("/v1/keys/lc/encrypt", json={"plaintext": "b25l"}, headers=app).json()
    r = client.post("/v1/keys/lc/rotate", headers=admin)
    assert r.status_code == 200 and r.json()["latest_version"] == 2
    assert client.post("/v1/keys/lc/rotate", headers=app).status_code == 403
    rw = client.post("/v1/keys/lc/rewrap", json={"ciphertext": ct1["ciphertext"]}, headers=app)
    assert rw.status_code == 200 and rw.json()["key_version"] == 2
    assert set(rw.json()) == {"ciphertext", "key_version"}  # never the plaintext
    assert rw.json()["ciphertext"].startswith("kms:v2:")
    r = client.patch("/v1/keys/lc", json={"min_decryption_version": 2}, headers=admin)
    assert r.status_code == 200 and r.json()["min_decryption_version"] == 2
    old = client.post("/v1/keys/lc/decrypt", json={"ciphertext": ct1["ciphertext"]}, headers=app)
    assert old.status_code == 400 and old.json()["code"] == "key_version_unavailable"
    new = client.post("/v1/keys/lc/decrypt", json={"ciphertext": rw.json()["ciphertext"]},
                      headers=app)
    assert base64.b64decode(new.json()["plaintext"]) == b"one"
    bad = client.patch("/v1/keys/lc", json={"min_decryption_version": 9}, headers=admin)
    assert bad.status_code == 400
    for nothing in ({}, {"enabled": None}):  # a PATCH that changes nothing is refused
        empty = client.patch("/v1/keys/lc", json=nothing, headers=admin)
        assert empty.status_code == 400 and empty.json()["field"] == "enabled", empty.text
    assert client.patch("/v1/keys/lc", json={"enabled": False}, headers=admin).status_code == 200
    off = client.post("/v1/keys/lc/encrypt", json={"plaintext": "eA=="}, headers=app)
    assert off.status_code == 403 and off.json()["code"] == "key_disabled"
    client.patch("/v1/keys/lc", json={"enabled": True}, headers=admin)
    r = client.patch("/v1/keys/lc/versions/1", json={"state": "compromised"}, headers=admin)
    assert r.status_code == 200 and r.json()["rewrap_required"] is True
    r = client.patch("/v1/keys/lc/versions/2", json={"state": "destroyed"}, headers=admin)
    assert r.status_code == 409 and r.json()["code"] == "invalid_state"
    r = client.patch("/v1/keys/lc/versions/1", json={"state": "gone"}, headers=admin)
    assert r.status_code == 400
    # batches: per-item results, per-item errors
    items = [{"plaintext": base64.b64encode(bytes([i]) * 10).decode()} for i in range(5)]
    enc = client.post("/v1/keys/lc/encrypt", json={"batch": items}, headers=app)
    assert enc.status_code == 200
    cts = [x["ciphertext"] for x in enc.json()["batch_results"]]
    assert len(cts) == 5 and all(x["key_version"] == 2 for x in enc.json()["batch_results"])
    dec = client.post("/v1/keys/lc/decrypt",
                      json={"batch": [{"ciphertext": c} for c in cts]
                            + [{"ciphertext": "kms:v2:AAAA"}, {"ciphertext": ct1["ciphertext"]}]},
                      headers=app)
    results = dec.json()["batch_results"]
    assert [base64.b64decode(x["plaintext"]) for x in results[:5]] == \
        [bytes([i]) * 10 for i in range(5)]
    assert results[5] == {"error": {"code": "decryption_failed", "status": 400}}
    assert results[6] == {"error": {"code": "key_version_unavailable", "status": 400}}
    both = client.post("/v1/keys/lc/encrypt", json={"plaintext": "eA==", "batch": items},
                       headers=app)
    assert both.status_code == 400
    empty = client.post("/v1/keys/lc/encrypt", json={"batch": []}, headers=app)
    assert empty.status_code == 400
    wrapped = client.post("/v1/keys/lc/datakey", json={"bits": 256, "wrapped_only": True},
                          headers=app)
    assert wrapped.status_code == 200 and set(wrapped.json()) == {"ciphertext"}


def test_deleted_volume_reports_its_erasure(client, kms, tenant) -> None:  # type: ignore[no-untyped-def]
    hv = tenant.auth("hypervisor")
    client.post("/v1/volumes", json={"volume_id": "gone-soon"}, headers=hv)
    live = client.get("/v1/volumes/gone-soon", headers=hv).json()
    assert live["status"] == "active" and "key" not in live
    r = client.delete("/v1/volumes/gone-soon", headers=hv)
    assert r.status_code == 204 and r.headers["kms-erasure-status"] == "pending_kek_rotation"
    assert r.headers["kms-erasure-complete-by"]
    status = client.get("/v1/volumes/gone-soon", headers=hv).json()
    assert status["status"] == "deleted"
    assert status["erasure"]["status"] == "pending_kek_rotation"
    kms.kek_rotation.rotate(tenant.id)
    status = client.get("/v1/volumes/gone-soon", headers=hv).json()
    assert status["erasure"]["status"] == "complete" and status["erasure"]["completed_at"]
    assert client.get("/v1/volumes/never-was", headers=hv).status_code == 404


def test_out_of_range_and_loosely_typed_input_is_a_4xx(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """Found by the break-it trial: each of these was a 500, or silently coerced."""
    admin, hv, app = tenant.auth("tenant-admin"), tenant.auth("hypervisor"), tenant.auth("app")
    client.post("/v1/keys", json={"name": "typed"}, headers=admin)
    r = client.patch("/v1/keys/typed/versions/9223372036854775808",
                     json={"state": "suspended"}, headers=admin)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    r = client.get("/v1/tenant/audit?since=9999-12-31T23:59:59-23:59", headers=admin)
    assert r.status_code == 400
    for body in ({"volume_id": "typed", "key_bits": "512"}, {"volume_id": "typed",
                                                             "key_bits": 512.0}):
        r = client.post("/v1/volumes", json=body, headers=hv)
        assert r.status_code == 400 and r.json()["field"] == "key_bits"
    r = client.patch("/v1/keys/typed", json={"enabled": "yes"}, headers=admin)
    assert r.status_code == 400
    for bad_id in (".", ".."):
        r = client.post("/v1/volumes", json={"volume_id": bad_id}, headers=hv)
        assert r.status_code == 400, bad_id
    r = client.post("/v1/keys/typed/encrypt", content=b'{"plaintext":"aGk="}',
                    headers={**app, "content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    r = client.put("/v1/volumes", headers=hv)
    assert r.status_code == 405 and r.headers["allow"]
    assert client.get("/v1/volumes", headers=hv).json()["volumes"] == []


@given(st.lists(st.tuples(st.text(), st.integers(min_value=1, max_value=2**31 - 1)),
                max_size=20))
def test_batch_answers_are_valid_json_whatever_the_strings(values) -> None:  # type: ignore[no-untyped-def]
    """The batch encrypt answer is written by hand (api.tenant_routes._batch_json):
    whatever the strings, it parses back to exactly what json.dumps would have said."""
    from api.tenant_routes import _batch_json
    from kms.transit import ItemResult

    out = json.loads(_batch_json([ItemResult(text, version) for text, version in values]))
    assert out == {"batch_results": [{"ciphertext": t, "key_version": v} for t, v in values]}


@given(st.lists(st.text(alphabet="ABCXYZabcxyz0189+/=:", max_size=40), max_size=30),
       st.integers(min_value=1, max_value=2**31 - 1), st.one_of(st.none(), st.text()))
def test_batch_answers_of_one_version_are_written_in_one_join(values, version, odd) -> None:  # type: ignore[no-untyped-def]
    """A batch's ciphertexts share one version and the ciphertext alphabet (the fast
    path); one odd string among them (quotes, escapes) takes the careful path. Either
    way the answer parses back to what json.dumps would have said."""
    from api.tenant_routes import _batch_json
    from kms.transit import ItemResult

    texts = values if odd is None else [*values, odd]
    out = json.loads(_batch_json([ItemResult(t, version) for t in texts]))
    assert out == {"batch_results": [{"ciphertext": t, "key_version": version} for t in texts]}


def test_a_trailing_slash_is_404_not_a_redirect(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """Found by a break-it trial: Starlette answered a trailing slash with a 307 to the
    Host header's name, which a client following redirects would resend its plaintext
    to. No redirect, from any route: a 404 problem, as for any unknown path."""
    app = tenant.auth("app")
    client.post("/v1/keys", json={"name": "slash"}, headers=tenant.auth("tenant-admin"))
    for method, path in (("POST", "/v1/keys/slash/encrypt/"), ("GET", "/v1/volumes/"),
                         ("GET", "/healthz/")):
        r = client.request(method, path, json={"plaintext": "aGk="},
                           headers={**app, "host": "evil.example"}, follow_redirects=False)
        assert r.status_code == 404, (method, path, r.status_code)
        assert "location" not in r.headers and r.json()["code"] == "not_found"


def test_credentials_are_checked_before_the_body(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """DESIGN: missing or invalid credentials answer 401. A bad body from a caller
    without valid credentials used to get the 400 naming the field, before any 401."""
    bad_bodies = ({"plaintext": 5}, {"plaintext": "aGk=", "extra": 1})
    client.post("/v1/keys", json={"name": "order"}, headers=tenant.auth("tenant-admin"))
    for headers in ({}, {"Authorization": "Bearer p-nobody.secret"},
                    {"Authorization": f"Bearer {tenant.tokens['app']}x"}):
        for body in bad_bodies:
            r = client.post("/v1/keys/order/encrypt", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthenticated", r.text
            assert "field" not in r.json()
        r = client.post("/v1/keys/order/encrypt", content=b"{not json",
                        headers={**headers, "content-type": "application/json"})
        assert r.status_code == 401
        # Bodies FastAPI cannot parse at all (a second break-it trial's finding: these
        # were 400 before any 401): bad UTF-8, nesting past the parser, a huge integer.
        for raw in (b'{"plaintext": "\xff"}', b"[" * 20_000, b'{"plaintext": ' + b"9" * 5000
                    + b"}"):
            r = client.post("/v1/keys/order/encrypt", content=raw,
                            headers={**headers, "content-type": "application/json"})
            assert r.status_code == 401, (raw[:20], r.text)
    # With valid credentials the same bodies still get their 400 and its field.
    r = client.post("/v1/keys/order/encrypt", json=bad_bodies[0], headers=tenant.auth("app"))
    assert r.status_code == 400 and r.json()["field"] == "plaintext"
    for raw in (b'{"plaintext": "\xff"}', b"[" * 20_000):
        r = client.post("/v1/keys/order/encrypt", content=raw,
                        headers={**tenant.auth("app"), "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text


def test_an_unknown_field_is_named_only_when_it_looks_like_one(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """Problems never echo the input; an unknown field's name is input. A second
    break-it trial had `"my card 4111-1111-1111-1111": 1` named in full (and a 100 KB one;
    here 30 KB). Such a name is "…"; a plain one is still named, as the contract's tests say."""
    app = tenant.auth("app")
    client.post("/v1/keys", json={"name": "names"}, headers=tenant.auth("tenant-admin"))
    for body, field in (({"plaintext": "aGk=", "my card 4111-1111-1111-1111": 1}, "…"),
                        ({"plaintext": "aGk=", "x" * 30_000: 1}, "…"),
                        ({"batch": [{"plaintext": "aGk=", "é secret": 1}]}, "batch.0.…"),
                        ({"plaintext": "aGk=", "extra": 1}, "extra")):
        r = client.post("/v1/keys/names/encrypt", json=body, headers=app)
        assert r.status_code == 400 and r.json()["field"] == field, r.text[:300]
        assert "4111" not in r.text and "secret" not in r.text


@pytest.mark.parametrize("raw", [
    b'{"volume_id": "dup-1", "volume_id": "dup-2"}',
    b'{"volume_id": "dup-3", "key_bits": 256, "key_bits": 512}',
    b'{"volume_id": "dup-4", "cipher": {"a": 1, "a": 2}}',
])
def test_duplicate_json_keys_are_400_and_change_nothing(client, tenant, raw) -> None:  # type: ignore[no-untyped-def]
    """Found by a break-it trial: the last duplicate won, so a proxy reading the first
    saw another request than the one acted on. A body with a duplicate key is refused."""
    hv = tenant.auth("hypervisor")
    r = client.post("/v1/volumes", content=raw,
                    headers={**hv, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    assert client.get("/v1/volumes", headers=hv).json()["volumes"] == []
    ok = client.post("/v1/volumes", content=b'{"volume_id": "dup-ok"}',
                     headers={**hv, "content-type": "application/json"})
    assert ok.status_code == 201


def test_a_duplicate_key_inside_a_batch_item_is_400(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """Nested, and with values the model accepts (so only the duplicate can refuse it)."""
    app = tenant.auth("app")
    client.post("/v1/keys", json={"name": "dupitem"}, headers=tenant.auth("tenant-admin"))
    raw = b'{"batch": [{"plaintext": "aGk=", "plaintext": "aGk="}]}'
    r = client.post("/v1/keys/dupitem/encrypt", content=raw,
                    headers={**app, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
    ok = client.post("/v1/keys/dupitem/encrypt", content=raw.replace(b', "plaintext": "aGk="', b""),
                     headers={**app, "content-type": "application/json"})
    assert ok.status_code == 200


def test_a_bad_batch_item_is_named_with_its_position(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """Found by a final check: a wrongly typed item was named "batch.plaintext" while a
    bad base64 item is "batch.1.plaintext"; both now name the position."""
    app = tenant.auth("app")
    client.post("/v1/keys", json={"name": "items"}, headers=tenant.auth("tenant-admin"))
    for item in ({"plaintext": 5}, {"plaintext": "!!"}):
        r = client.post("/v1/keys/items/encrypt",
                        json={"batch": [{"plaintext": "aGk="}, item]}, headers=app)
        assert r.status_code == 400 and r.json()["field"] == "batch.1.plaintext", r.text
    r = client.post("/v1/keys/items/encrypt", content=b'{"batch": [',
                    headers={**app, "content-type": "application/json"})
    assert r.status_code == 400 and "field" not in r.json()


@pytest.mark.parametrize("method, path, role", [
    ("POST", "/v1/keys/rot-k/rotate", "tenant-admin"),
    ("POST", "/v1/volumes/vol-nb/key", "hypervisor"),
    ("DELETE", "/v1/volumes/vol-nb", "hypervisor"),
])
@pytest.mark.parametrize("body", [b'{"garbage', b'{"extra": 1}', b"{}"])
def test_a_route_that_takes_no_body_refuses_one_and_changes_nothing(
        client, tenant, method, path, role, body) -> None:  # type: ignore[no-untyped-def]
    """FastAPI ignores a body a route does not declare; here it is a 400, and nothing is
    rotated, released or deleted. Without valid credentials it is still the 401."""
    client.post("/v1/keys", json={"name": "rot-k", "type": "aes256-gcm"},
                headers=tenant.auth("tenant-admin"))
    client.post("/v1/volumes", json={"volume_id": "vol-nb"}, headers=tenant.auth("hypervisor"))
    latest = client.get("/v1/keys/rot-k", headers=tenant.auth("tenant-admin")).json()
    h = {**tenant.auth(role), "content-type": "application/json"}
    r = client.request(method, path, content=body, headers=h)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    assert "key" not in r.json()
    assert client.get("/v1/keys/rot-k", headers=tenant.auth("tenant-admin")).json() == latest
    assert client.get("/v1/volumes/vol-nb", headers=tenant.auth("hypervisor")).status_code == 200
    anon = client.request(method, path, content=body,
                          headers={"authorization": "Bearer nope",
                                   "content-type": "application/json"})
    assert anon.status_code == 401


def test_an_encoded_slash_in_the_path_is_refused(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """`vol%2fkey` must not be routed as `vol/key`: no key leaves, 400."""
    h = tenant.auth("hypervisor")
    client.post("/v1/volumes", json={"volume_id": "vol-sl"}, headers=h)
    for raw in ("/v1/volumes/vol-sl%2fkey", "/v1/volumes/vol-sl%2Fkey"):
        r = client.post(raw, headers=h)
        assert r.status_code == 400 and r.json()["code"] == "invalid_request", raw
        assert "key" not in r.json()


@pytest.mark.parametrize("raw", ["1.0", "+1", "01", "%201", "1_0", "0", "-1", "1e0",
                                 "9999999999"])
def test_a_version_in_the_path_is_its_plain_decimal_number(client, tenant, raw) -> None:  # type: ignore[no-untyped-def]
    """`PATCH /v1/keys/{name}/versions/{v}` reads v strictly: nothing else acts on v1."""
    admin = tenant.auth("tenant-admin")
    client.post("/v1/keys", json={"name": "vp"}, headers=admin)
    r = client.patch(f"/v1/keys/vp/versions/{raw}", json={"state": "suspended"}, headers=admin)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", (raw, r.text)
    v1 = client.get("/v1/keys/vp", headers=admin).json()
    assert client.post("/v1/keys/vp/encrypt", json={"plaintext": "eA=="},
                       headers=tenant.auth("app")).status_code == 200, v1
    ok = client.patch("/v1/keys/vp/versions/1", json={"state": "active"}, headers=admin)
    assert ok.status_code in (200, 409)


def test_an_empty_chunked_body_is_no_body(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """A route that takes no body accepts an empty one, however it is framed."""
    h = {**tenant.auth("hypervisor"), "content-type": "application/json"}
    client.post("/v1/volumes", json={"volume_id": "vol-ch"}, headers=tenant.auth("hypervisor"))

    def nothing():  # type: ignore[no-untyped-def]
        yield b""

    r = client.post("/v1/volumes/vol-ch/key", content=nothing(), headers=h)
    assert r.status_code == 200, r.text

    def something():  # type: ignore[no-untyped-def]
        yield b'{"x": 1}'

    r = client.post("/v1/volumes/vol-ch/key", content=something(), headers=h)
    assert r.status_code == 400 and "key" not in r.json()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.text(), _json_values, max_size=6))
def test_fast_json_answers_are_starlettes_byte_for_byte(body) -> None:  # type: ignore[no-untyped-def]
    """The data plane's answers are written by pydantic_core (a third of JSONResponse's
    cost); what they hold (strings, integers, booleans, null, no floats) comes out as
    Starlette's JSONResponse writes it."""
    from starlette.responses import JSONResponse

    from api.responses import Json

    assert Json(body).body == JSONResponse(body).body
    assert Json(body).headers["content-type"] == "application/json"


def test_two_authorization_headers_are_refused(client, tenant) -> None:  # type: ignore[no-untyped-def]
    """A break-it trial's note: with two Authorization headers the first was used. A
    proxy that checks the last would then have let through another credential than the
    one the service acts on: 401, whichever of them is valid."""
    app = tenant.auth("app")["Authorization"]
    hv = tenant.auth("hypervisor")["Authorization"]
    client.post("/v1/keys", json={"name": "two"}, headers=tenant.auth("tenant-admin"))
    for pair in ((app, "Bearer nope"), ("Bearer nope", app), (app, app), (hv, app)):
        r = client.post("/v1/keys/two/encrypt", json={"plaintext": "aGk="},
                        headers=[("Authorization", pair[0]), ("Authorization", pair[1])])
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated", (pair, r.text)
    ok = client.post("/v1/keys/two/encrypt", json={"plaintext": "aGk="}, headers={"Authorization": app})
    assert ok.status_code == 200
