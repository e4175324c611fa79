"""Tenant principals and their bearer tokens.

A token is `<principal id>.<43 characters of base64url>`: 256 random bits after the dot.
Only SHA-256 of the secret part is stored; it is compared in constant time. The token
is returned once, at creation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from kms.audit import AuditJournal
from kms.caller import ROLES, Caller
from kms.clock import Clock
from kms.db import Database
from kms.errors import IncompatibleRoles, InvalidRequest, NotFound, Unauthenticated
from kms.models import Principal
from kms.tenants import ERASED, ERASING, load_tenant, require_usable_status
from kms.validation import check_identifier

# A column for the journal's release checks: 1 while the principal is not revoked, 0 once
# it is (its one parameter: the principal id).
LIVE_PRINCIPAL_SQL = ("(SELECT COUNT(*) FROM principals lp "
                      "WHERE lp.id = ? AND lp.revoked_at IS NULL)")

_SECRET_BYTES = 32
_DUMMY_DIGEST = hashlib.sha256(b"no such principal").digest()
_AUTH = ("SELECT p.token_digest, p.revoked_at, p.role, p.tenant_id, t.status, t.epoch "
         "FROM principals p JOIN tenants t ON t.id = p.tenant_id WHERE p.id = ?")


@dataclass(frozen=True)
class IssuedToken:
    """A new principal and its token. The token is shown once; repr hides it."""

    principal_id: str
    tenant_id: str
    role: str
    name: str
    token: str

    def __repr__(self) -> str:
        return (f"IssuedToken(principal_id={self.principal_id!r}, tenant_id={self.tenant_id!r}, "
                f"role={self.role!r}, token=<hidden>)")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


DEFAULT_INCOMPATIBLE_ROLES: tuple[tuple[str, str], ...] = (
    # Separation of duties (9.3 f): who manages keys does not use them.
    ("tenant-admin", "app"),
    ("tenant-admin", "hypervisor"),
)


class PrincipalService:
    def __init__(self, *, db: Database, clock: Clock, audit: AuditJournal,
                 incompatible_roles: tuple[tuple[str, str], ...] = DEFAULT_INCOMPATIBLE_ROLES):
        self._db, self._clock, self._audit = db, clock, audit
        self._incompatible = {frozenset(pair) for pair in incompatible_roles}

    def create(self, *, tenant_id: str, role: str, name: str) -> IssuedToken:
        check_identifier(tenant_id, field="tenant_id")
        check_identifier(name, field="name")
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", field="role")
        secret = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).decode().rstrip("=")
        principal_id = f"p-{secrets.token_hex(8)}"
        with self._db.write() as s:
            tenant = load_tenant(s, tenant_id)
            if tenant.status in (ERASING, ERASED):
                raise InvalidRequest("tenant has been erased", field="tenant_id")
            held = s.scalars(select(Principal.role).where(
                Principal.tenant_id == tenant_id, Principal.name == name,
                Principal.revoked_at.is_(None))).all()
            for other in held:
                if frozenset((other, role)) in self._incompatible:
                    raise IncompatibleRoles(f"{name} already holds {other}, incompatible with "
                                            f"{role}", field="role")
            s.add(Principal(id=principal_id, tenant_id=tenant_id, name=name, role=role,
                            token_digest=_digest(secret), created_at=self._clock.now()))
            self._audit.record(s, action="principal.create", tenant_id=tenant_id,
                               object=f"principal:{principal_id}:{role}")
        return IssuedToken(principal_id, tenant_id, role, name, f"{principal_id}.{secret}")

    def authenticate(self, token: str) -> Caller:
        """Return the caller for a bearer token (one Core query: principal and tenant).

        Raises Unauthenticated for any unknown, malformed or revoked token, and the tenant
        state errors (suspended, erased) for a valid token of such a tenant."""
        principal_id, _, secret = token.partition(".")
        row = None
        if 1 <= len(principal_id) <= 128 and secret:
            row = self._db.fetchone(self._db.sql(_AUTH), (principal_id,))
        stored = row[0] if row is not None else _DUMMY_DIGEST
        matches = hmac.compare_digest(_digest(secret), bytes(stored))
        if row is None or not matches or row[1] is not None:
            raise Unauthenticated("invalid bearer token")
        _, _, role, tenant_id, status, epoch = row
        require_usable_status(status)
        return Caller(principal_id, tenant_id, role, epoch)

    def revoke(self, principal_id: str) -> dict[str, object]:
        """Revoke a principal: its token is refused from now on (idempotent)."""
        check_identifier(principal_id, field="principal_id")
        with self._db.write() as s:
            p = s.get(Principal, principal_id)
            if p is None:
                raise NotFound("no such principal", what="principal")
            if p.revoked_at is None:
                p.revoked_at = self._clock.now()
                self._audit.record(s, action="principal.revoke", tenant_id=p.tenant_id,
                                   object=f"principal:{p.id}")
            return {"id": p.id, "tenant": p.tenant_id, "revoked": True}

    def list_for_tenant(self, tenant_id: str) -> list[dict[str, object]]:
        with self._db.read() as s:
            rows = s.scalars(select(Principal).where(Principal.tenant_id == tenant_id))
            return [{"id": p.id, "name": p.name, "role": p.role,
                     "revoked": p.revoked_at is not None} for p in rows]
