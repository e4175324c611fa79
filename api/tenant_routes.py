"""Routes of the tenant API (`/v1`). Thin: parse, call `kms`, shape the answer.

Tenant scoping and role checks happen in the services, from the authenticated Caller.
Key material leaves only through `POST /v1/volumes/{id}/key` and the `datakey`/`decrypt`
answers whose job is to return it.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from api.deps import KmsDep, TokenDep
from api.problems import language, status_of
from kms.audit import current_context
from kms.caller import ROLE_TENANT_ADMIN, Caller
from kms.clock import require_aware
from kms.errors import InvalidRequest
from kms.secret import SecretBytes

router = APIRouter(prefix="/v1")


def authenticate(token: TokenDep, kms: KmsDep) -> Caller:
    caller = kms.principals.authenticate(token)
    current_context().actor = caller.actor
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]


class _Strict(BaseModel):
    """Unknown fields refused; no coercion ("512" is not 512, "yes" is not true)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class VolumeCreate(_Strict):
    volume_id: str
    cipher: str = "aes-xts-plain64"
    key_bits: int = 512


class KeyCreate(_Strict):
    name: str
    type: str = "aes256-gcm"


class EncryptItem(_Strict):
    plaintext: str
    context: str | None = None


class EncryptBody(_Strict):
    plaintext: str | None = None
    context: str | None = None
    batch: list[EncryptItem] | None = None


class DecryptItem(_Strict):
    ciphertext: str = Field(max_length=1 << 24)
    context: str | None = None


class DecryptBody(_Strict):
    ciphertext: str | None = Field(default=None, max_length=1 << 24)
    context: str | None = None
    batch: list[DecryptItem] | None = None


class DatakeyBody(_Strict):
    bits: int = 256
    context: str | None = None
    wrapped_only: bool = False


class KeyPatch(_Strict):
    min_decryption_version: int | None = None
    enabled: bool | None = None


class VersionPatch(_Strict):
    state: str


def _b64(value: str | None, field: str) -> bytes:
    if value is None:
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("not standard base64", field=field) from None


def _b64out(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- volumes (hypervisor) -------------------------------------------------------------

@router.post("/volumes", status_code=201)
def create_volume(body: VolumeCreate, caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    return kms.volumes.create(caller, volume_id=body.volume_id, cipher=body.cipher,
                              key_bits=body.key_bits).public()


@router.get("/volumes")
def list_volumes(caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    return {"volumes": [v.public() for v in kms.volumes.list(caller)]}


@router.post("/volumes/{volume_id}/key")
def fetch_volume_key(volume_id: str, caller: CallerDep, kms: KmsDep) -> Response:
    vk = kms.volumes.fetch_key(caller, volume_id)
    body = {"volume_id": vk.volume_id, "key": _b64out(vk.key.reveal()), "cipher": vk.cipher,
            "key_bits": vk.key_bits}
    return _no_store(body)


@router.get("/volumes/{volume_id}")
def volume_status(volume_id: str, caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    """A live volume, or a deleted one with the status of its erasure."""
    return kms.volumes.status(caller, volume_id)


@router.delete("/volumes/{volume_id}", status_code=204)
def delete_volume(volume_id: str, caller: CallerDep, kms: KmsDep) -> Response:
    """204 as the contract says; the headers tell when the erasure will be complete."""
    erasure = kms.volumes.delete(caller, volume_id)["erasure"]
    headers = {"Kms-Erasure-Status": erasure["status"]}
    if "complete_by" in erasure:
        headers["Kms-Erasure-Complete-By"] = erasure["complete_by"]
    return Response(status_code=204, headers=headers)


# -- application keys -------------------------------------------------------------------

@router.post("/keys", status_code=201)
def create_key(body: KeyCreate, caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    return kms.appkeys.create(caller, name=body.name, key_type=body.type).public()


@router.get("/keys")
def list_keys(caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    return {"keys": [k.public() for k in kms.appkeys.list(caller)]}


@router.get("/keys/{name}")
def show_key(name: str, caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    return kms.appkeys.show(caller, name).public()


@router.patch("/keys/{name}")
def update_key(name: str, body: KeyPatch, caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    return kms.appkeys.update(caller, name, min_decryption_version=body.min_decryption_version,
                              enabled=body.enabled).public()


@router.post("/keys/{name}/rotate")
def rotate_key(name: str, caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    return kms.appkeys.rotate(caller, name).public()


@router.patch("/keys/{name}/versions/{version}")
def set_version_state(name: str, version: Annotated[int, Path(ge=1, le=2**31 - 1)],
                      body: VersionPatch, caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    return kms.appkeys.set_version_state(caller, name, version, body.state).public()


@router.post("/keys/{name}/encrypt")
def encrypt(name: str, body: EncryptBody, caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    if (body.plaintext is None) == (body.batch is None):
        raise InvalidRequest("give either plaintext or batch", field="plaintext")
    if body.batch is None:
        ciphertext, version = kms.transit.encrypt(
            caller, name, _b64(body.plaintext, "plaintext"),
            context=_b64(body.context, "context"))
        return {"ciphertext": ciphertext, "key_version": version}
    items = [(_b64(i.plaintext, f"batch.{n}.plaintext"), _b64(i.context, f"batch.{n}.context"))
             for n, i in enumerate(body.batch)]
    results = kms.transit.encrypt_batch(caller, name, items)
    return {"batch_results": [{"ciphertext": r.value, "key_version": r.version}
                              for r in results]}


@router.post("/keys/{name}/decrypt")
def decrypt(name: str, body: DecryptBody, caller: CallerDep, kms: KmsDep,
            request: Request) -> Response:
    if (body.ciphertext is None) == (body.batch is None):
        raise InvalidRequest("give either ciphertext or batch", field="ciphertext")
    if body.batch is None:
        plaintext = kms.transit.decrypt(caller, name, body.ciphertext or "",
                                        context=_b64(body.context, "context"))
        return _no_store({"plaintext": _b64out(plaintext.reveal())})
    items = [(i.ciphertext, _b64(i.context, f"batch.{n}.context"))
             for n, i in enumerate(body.batch)]
    lang = language(request.headers.get("accept-language"))
    out: list[dict[str, Any]] = []
    for r in kms.transit.decrypt_batch(caller, name, items):
        if r.error is not None:
            out.append({"error": {"code": r.error.code, "status": status_of(r.error.code)}})
        else:
            assert isinstance(r.value, SecretBytes)
            out.append({"plaintext": _b64out(r.value.reveal())})
    return _no_store({"batch_results": out}, lang)


@router.post("/keys/{name}/rewrap")
def rewrap(name: str, body: DecryptItem, caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    ciphertext, version = kms.transit.rewrap(caller, name, body.ciphertext,
                                             context=_b64(body.context, "context"))
    return {"ciphertext": ciphertext, "key_version": version}


@router.post("/keys/{name}/datakey")
def datakey(name: str, body: DatakeyBody, caller: CallerDep, kms: KmsDep) -> Response:
    dk = kms.transit.datakey(caller, name, bits=body.bits, context=_b64(body.context, "context"),
                             wrapped_only=body.wrapped_only)
    if dk.plaintext is None:
        return _no_store({"ciphertext": dk.ciphertext})
    return _no_store({"plaintext": _b64out(dk.plaintext.reveal()), "ciphertext": dk.ciphertext})


# -- the tenant itself ------------------------------------------------------------------

@router.get("/tenant")
def tenant(caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    return kms.tenants.show(caller.tenant_id).public()


@router.get("/tenant/notice")
def tenant_notice(caller: CallerDep, kms: KmsDep) -> dict[str, Any]:
    """The signed end-of-contract notice, with the public key that verifies it."""
    caller.require(ROLE_TENANT_ADMIN)
    notice = kms.lifecycle.notice(caller.tenant_id)
    return {**notice.public(), "public_key_pem": kms.service_public_key_pem()}


@router.get("/tenant/audit")
def tenant_audit(caller: CallerDep, kms: KmsDep, since: str | None = None) -> Response:
    """The tenant's own journal events, as JSON lines (12.6 d)."""
    caller.require(ROLE_TENANT_ADMIN)
    lines = kms.audit_export(tenant_id=caller.tenant_id, since=_since(since))
    return Response("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in lines),
                    media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return require_aware(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise InvalidRequest("since must be an ISO 8601 time with a zone", field="since") \
            from None


def _no_store(body: dict[str, Any], lang: str | None = None) -> Response:
    headers = {"Cache-Control": "no-store"}
    if lang:
        headers["Content-Language"] = lang
    return JSONResponse(body, headers=headers)
