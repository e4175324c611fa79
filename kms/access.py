"""Who can do what on which resource (SecNumCloud 9.3 d, e), derived from the roles.

The role → action table is the one the services enforce (`Caller.require`), written out
so that it can be listed per resource and per principal."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from kms.caller import ROLE_APP, ROLE_HYPERVISOR, ROLE_TENANT_ADMIN
from kms.db import Database
from kms.errors import NotFound
from kms.models import AppKey, Principal, Volume
from kms.tenants import load_tenant
from kms.validation import check_identifier

ACTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    ROLE_TENANT_ADMIN: {"tenant": ("read", "read-notice", "read-audit"),
                        "key": ("create", "read", "list", "rotate", "update")},
    ROLE_HYPERVISOR: {"tenant": ("read",),
                      "volume": ("create", "list", "fetch-key", "delete")},
    ROLE_APP: {"tenant": ("read",),
               "key": ("read", "list", "encrypt", "decrypt", "datakey", "rewrap")},
}


class AccessService:
    def __init__(self, *, db: Database):
        self._db = db

    def for_tenant(self, tenant_id: str) -> list[dict[str, Any]]:
        """One row per (resource, principal) of the tenant, with the allowed actions."""
        check_identifier(tenant_id, field="tenant_id")
        with self._db.read() as s:
            load_tenant(s, tenant_id)
            principals = list(s.scalars(select(Principal).where(
                Principal.tenant_id == tenant_id, Principal.revoked_at.is_(None))
                .order_by(Principal.id)))
            resources = [("tenant", tenant_id)]
            resources += [("volume", v) for v in s.scalars(
                select(Volume.volume_id).where(Volume.tenant_id == tenant_id).order_by(
                    Volume.volume_id))]
            resources += [("key", k) for k in s.scalars(
                select(AppKey.name).where(AppKey.tenant_id == tenant_id).order_by(AppKey.name))]
        rows = []
        for kind, name in resources:
            for p in principals:
                actions = ACTIONS.get(p.role, {}).get(kind)
                if actions:
                    rows.append({"resource": f"{kind}:{name}", "principal": p.id,
                                 "name": p.name, "role": p.role, "actions": list(actions)})
        return rows

    def for_principal(self, principal_id: str) -> list[dict[str, Any]]:
        check_identifier(principal_id, field="principal_id")
        with self._db.read() as s:
            p = s.get(Principal, principal_id)
            if p is None:
                raise NotFound("no such principal", what="principal")
            tenant_id, revoked = p.tenant_id, p.revoked_at is not None
        if revoked:
            return []
        return [r for r in self.for_tenant(tenant_id) if r["principal"] == principal_id]
