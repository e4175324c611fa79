"""A token that goes away answers 503 with Retry-After — never a 500 — and the service
recovers by itself when it comes back; a finalized library is re-initialised."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from hsm import HsmUnavailable
from hsm.adapter import _LibState
from kms.config import Settings
from kms.service import Kms


class UnpluggableHsm:
    """The real adapter behind a switch: while unplugged, every call fails like a token
    that has been removed (the adapter's own translation of CKR_DEVICE_REMOVED)."""

    def __init__(self, real: Any):
        self._real, self.plugged = real, True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.plugged:
                raise HsmUnavailable("the security token is unavailable")
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def unpluggable(kms, new_tenant):  # type: ignore[no-untyped-def]
    hsm = UnpluggableHsm(kms.hsm)
    k = Kms(db=kms.db, hsm=hsm, clock=kms.clock)  # type: ignore[arg-type]
    tenant = new_tenant()
    with TestClient(create_app(Settings(), k), raise_server_exceptions=False) as client:
        yield hsm, client, tenant


def test_unplugged_token_is_503_with_retry_after_then_recovers(unpluggable) -> None:  # type: ignore[no-untyped-def]
    hsm, client, t = unpluggable
    hv, app, admin = t.auth("hypervisor"), t.auth("app"), t.auth("tenant-admin")
    assert client.post("/v1/volumes", json={"volume_id": "v"}, headers=hv).status_code == 201
    assert client.post("/v1/keys", json={"name": "k"}, headers=admin).status_code == 201
    ct = client.post("/v1/keys/k/encrypt", json={"plaintext": "aGk="}, headers=app).json()
    hsm.plugged = False
    calls = [
        ("POST", "/v1/volumes/v/key", None, hv),
        ("POST", "/v1/volumes", {"volume_id": "w"}, hv),
        ("DELETE", "/v1/volumes/v", None, hv),
        ("POST", "/v1/keys", {"name": "k2"}, admin),
        ("POST", "/v1/keys/k/rotate", None, admin),
        ("POST", "/v1/keys/k/encrypt", {"plaintext": "aGk="}, app),
        ("POST", "/v1/keys/k/decrypt", {"ciphertext": ct["ciphertext"]}, app),
        ("POST", "/v1/keys/k/datakey", {"bits": 256}, app),
    ]
    for method, path, body, headers in calls:
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 503, (method, path, r.status_code, r.text)
        assert r.json()["code"] == "service_unavailable" and r.headers["retry-after"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["token"] is False
    hsm.plugged = True
    assert client.get("/readyz").status_code == 200
    key = client.post("/v1/volumes/v/key", headers=hv)
    assert key.status_code == 200 and len(base64.b64decode(key.json()["key"])) == 64
    dec = client.post("/v1/keys/k/decrypt", json={"ciphertext": ct["ciphertext"]}, headers=app)
    assert dec.json()["plaintext"] == "aGk="


def test_library_finalized_underneath_is_reinitialised(client, kms, tenant) -> None:  # type: ignore[no-untyped-def]
    """C_Finalize behind the adapter's back (every session and handle gone): the next
    request re-initialises, logs in again, finds keys by CKA_ID — no restart."""
    hv = tenant.auth("hypervisor")
    client.post("/v1/volumes", json={"volume_id": "fin"}, headers=hv)
    before = client.post("/v1/volumes/fin/key", headers=hv).json()["key"]
    with kms.hsm.exclusive():
        lib, _gen = _LibState.get(kms.hsm._module_path)
        lib.finalize()
    after = client.post("/v1/volumes/fin/key", headers=hv)
    assert after.status_code == 200 and after.json()["key"] == before
    assert client.get("/readyz").status_code == 200
