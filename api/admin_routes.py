"""Routes of the admin API (`/admin/v1`), for the provider's operators only.

Login takes password + TOTP and returns a short-lived session token; every other route
needs `Authorization: Bearer <session token>`. Tenant principals' tokens are refused.
The operations are those of the `kms` command, through the same services.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from api.deps import KmsDep, TokenDep
from api.strict_json import StrictJsonRoute
from kms.audit import current_context
from kms.errors import InvalidRequest
from kms.lifecycle import parse_contract_end
from kms.operators import OperatorCaller

router = APIRouter(prefix="/admin/v1", route_class=StrictJsonRoute)


def authenticate_operator(token: TokenDep, kms: KmsDep) -> OperatorCaller:
    op = kms.operators.authenticate(token)
    current_context().actor = f"operator:{op.username}"
    return op


OperatorDep = Annotated[OperatorCaller, Depends(authenticate_operator)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LoginBody(_Strict):
    username: str = Field(max_length=128)
    password: str = Field(max_length=4096)
    totp: str = Field(max_length=16)


class TenantBody(_Strict):
    name: str


class PrincipalBody(_Strict):
    role: str
    name: str


class OffboardBody(_Strict):
    contract_end: str | None = None


@router.post("/login")
def login(body: LoginBody, kms: KmsDep) -> Response:
    session = kms.operators.login(body.username, body.password, body.totp)
    return JSONResponse({"token": session.token, "expires_at": session.expires_at.isoformat()},
                        headers={"Cache-Control": "no-store"})


@router.post("/logout", status_code=204)
def logout(op: OperatorDep, kms: KmsDep) -> Response:
    kms.operators.logout(op)
    return Response(status_code=204)


@router.get("/tenants")
def list_tenants(op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    return {"tenants": [t.public() for t in kms.tenants.list()]}


@router.post("/tenants", status_code=201)
def create_tenant(body: TenantBody, op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    return kms.tenants.create(body.name).public()


@router.get("/tenants/{tenant_id}")
def show_tenant(tenant_id: str, op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    return {**kms.tenants.show(tenant_id).public(),
            "principals": kms.principals.list_for_tenant(tenant_id)}


@router.post("/tenants/{tenant_id}/principals", status_code=201)
def create_principal(tenant_id: str, body: PrincipalBody, op: OperatorDep,
                     kms: KmsDep) -> Response:
    issued = kms.principals.create(tenant_id=tenant_id, role=body.role, name=body.name)
    return JSONResponse({"id": issued.principal_id, "tenant": issued.tenant_id,
                         "role": issued.role, "token": issued.token}, status_code=201,
                        headers={"Cache-Control": "no-store"})


@router.delete("/principals/{principal_id}")
def revoke_principal(principal_id: str, op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    return kms.principals.revoke(principal_id)


@router.post("/tenants/{tenant_id}/offboard", status_code=201)
def offboard(tenant_id: str, body: OffboardBody, op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    notice = kms.lifecycle.serve_notice(tenant_id,
                                        contract_end=parse_contract_end(body.contract_end))
    return notice.public()


@router.post("/tenants/{tenant_id}/cancel-offboard")
def cancel_offboard(tenant_id: str, op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    return kms.lifecycle.cancel_notice(tenant_id)


@router.post("/tenants/{tenant_id}/suspend")
def suspend(tenant_id: str, op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    return kms.lifecycle.suspend(tenant_id)


@router.post("/tenants/{tenant_id}/resume")
def resume(tenant_id: str, op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    return kms.lifecycle.resume(tenant_id)


@router.get("/tenants/{tenant_id}/notice")
def notice(tenant_id: str, op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    return {**kms.lifecycle.notice(tenant_id).public(),
            "public_key_pem": kms.service_public_key_pem()}


@router.get("/erasures")
def erasures(op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    return {"erasures": kms.erasure.status()}


@router.get("/tenants/{tenant_id}/certificate")
def certificate(tenant_id: str, op: OperatorDep, kms: KmsDep) -> dict[str, Any]:
    document, signature = kms.erasure.certificate(tenant_id)
    return {"document": document.decode(), "signature": base64.b64encode(signature).decode(),
            "public_key_pem": kms.service_public_key_pem()}


@router.get("/access")
def access(op: OperatorDep, kms: KmsDep, tenant: str | None = None,
           principal: str | None = None) -> dict[str, Any]:
    if (tenant is None) == (principal is None):
        raise InvalidRequest("give exactly one of tenant or principal", field="tenant")
    rows = (kms.access.for_tenant(tenant) if tenant is not None
            else kms.access.for_principal(principal or ""))
    return {"access": rows}
