"""`api.strict_json.StrictJsonRoute`: duplicate keys refused, and the data plane's
well-formed requests called without FastAPI's dependency resolution, every other request
answered by FastAPI's own handler, so that both paths give the same answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.responses import Response

from api.responses import Json
from api.strict_json import StrictJsonRoute
from api.tenant_routes import DatakeyBody, DecryptBody, EncryptBody


class _Slow(StrictJsonRoute):
    fast_path = False


def _app(route_class: type[StrictJsonRoute]) -> FastAPI:
    router = APIRouter(prefix="/v1", route_class=route_class)

    @router.post("/keys/{name}/encrypt")
    async def encrypt(name: str, body: EncryptBody, request: Request) -> Response:
        return Json({"name": name, "body": body.model_dump()})

    @router.post("/keys/{name}/decrypt")
    async def decrypt(name: str, body: DecryptBody, request: Request) -> Response:
        return Json({"name": name, "body": body.model_dump()})

    @router.post("/keys/{name}/datakey")
    async def datakey(name: str, body: DatakeyBody, request: Request) -> Response:
        return Json({"name": name, "body": body.model_dump()})

    @router.post("/volumes/{volume_id}/key")
    async def key(volume_id: str, request: Request) -> Response:
        return Json({"volume_id": volume_id})

    app = FastAPI()
    app.include_router(router)
    return app


FAST = TestClient(_app(StrictJsonRoute), raise_server_exceptions=False)
SLOW = TestClient(_app(_Slow), raise_server_exceptions=False)

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.text(max_size=6),
                    st.sampled_from(["aGk=", "kms:v1:AAAA", "512"]))
_field = st.sampled_from(["plaintext", "context", "batch", "ciphertext", "bits",
                          "wrapped_only", "extra"])
_item = st.dictionaries(_field, _scalar, max_size=3)
_value = st.one_of(_scalar, st.lists(st.one_of(_item, _scalar), max_size=3))
_object = st.dictionaries(_field, _value, max_size=4)


@st.composite
def _body(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(["object", "object", "object", "duplicate", "json",
                                 "bytes", "none"]))
    if kind == "object":
        return json.dumps(draw(_object)).encode()
    if kind == "duplicate":
        return b'{"plaintext": "aGk=", "plaintext": "eA=="}'
    if kind == "json":
        return json.dumps(draw(_value)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=12))
    return None


def _answer(client: TestClient, path: str, body: bytes | None,
            content_type: str | None) -> tuple[int, Any]:
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post(path, content=body, headers=headers)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/keys/k-1/encrypt", "/v1/keys/k%20x/decrypt",
                             "/v1/keys/k/datakey", "/v1/volumes/vol-1/key"]),
       body=_body(),
       content_type=st.sampled_from([None, "application/json", "application/json",
                                     "application/json; charset=utf-8", "text/plain",
                                     "application/merge-patch+json", "APPLICATION/JSON"]))
def test_the_direct_call_answers_as_fastapis_handler_does(
        path: str, body: bytes | None, content_type: str | None) -> None:
    fast = _answer(FAST, path, body, content_type)
    assert fast == _answer(SLOW, path, body, content_type)


def test_well_formed_data_plane_requests_skip_dependency_resolution(
        client, tenant, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With FastAPI's dependency resolution broken, the service's data plane still
    answers well-formed requests (so they do not go through it), and a malformed one
    goes through it (so its refusal is FastAPI's)."""
    import fastapi.routing

    admin, app, hv = (tenant.auth(r) for r in ("tenant-admin", "app", "hypervisor"))
    assert client.post("/v1/keys", json={"name": "direct"}, headers=admin).status_code == 201
    assert client.post("/v1/volumes", json={"volume_id": "vol-d"}, headers=hv).status_code \
        == 201

    async def broken(**_: Any) -> Any:
        raise RuntimeError("dependency resolution was called")

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", broken)
    enc = client.post("/v1/keys/direct/encrypt", json={"plaintext": "aGk="}, headers=app)
    assert enc.status_code == 200, enc.text
    dec = client.post("/v1/keys/direct/decrypt", json={"ciphertext": enc.json()["ciphertext"]},
                      headers=app)
    assert dec.status_code == 200 and dec.json()["plaintext"] == "aGk="
    assert client.post("/v1/keys/direct/datakey", json={"bits": 256},
                       headers=app).status_code == 200
    assert client.post("/v1/volumes/vol-d/key", headers=hv).status_code == 200
    assert client.post("/v1/keys/direct/encrypt", json={"plaintext": 5},
                       headers=app).status_code == 500


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_a_duplicate_key_is_refused_on_both_paths(client, tenant,  # type: ignore[no-untyped-def]
                                                  content_type: str) -> None:
    app = tenant.auth("app")
    client.post("/v1/keys", json={"name": "dup"}, headers=tenant.auth("tenant-admin"))
    r = client.post("/v1/keys/dup/encrypt", content=b'{"plaintext": "aGk=", "plaintext": "eA=="}',
                    headers={**app, "content-type": content_type})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text
