"""Tenants: creation (with their first KEK in the token), listing, state checks."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kms.audit import AuditJournal
from kms.clock import Clock
from kms.db import Database
from kms.errors import AlreadyExists, NotFound, TenantErased, TenantInNotice, TenantSuspended
from kms.keyring import Keyring
from kms.models import Notice, Tenant
from kms.validation import check_identifier, normalize_tenant_name

ACTIVE, SUSPENDED, NOTICE, ERASING, ERASED = "active", "suspended", "notice", "erasing", "erased"


@dataclass(frozen=True)
class TenantView:
    id: str
    name: str
    status: str
    created_at: datetime
    notice: dict[str, str] | None = None

    def public(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "status": self.status, "notice": self.notice}


def _view(t: Tenant, notice: Notice | None = None) -> TenantView:
    summary = None
    if notice is not None:
        summary = {"id": notice.id, "served_at": notice.served_at.isoformat(),
                   "effective_at": notice.effective_at.isoformat()}
    return TenantView(t.id, t.name, t.status, t.created_at, summary)


def pending_notice(session: Session, tenant_id: str) -> Notice | None:
    """The tenant's notice that has not been cancelled (kept after erasure as a record)."""
    return session.scalars(select(Notice).where(Notice.tenant_id == tenant_id,
                                                Notice.cancelled_at.is_(None))
                           .order_by(Notice.served_at.desc()).limit(1)).first()


class _HasStatus(Protocol):
    @property
    def status(self) -> str: ...


def require_usable(tenant: _HasStatus) -> None:
    """Existing keys work in `active` and `notice` (reversibility, 19.1 g)."""
    require_usable_status(tenant.status)


def require_usable_status(status: str) -> None:
    if status == SUSPENDED:
        raise TenantSuspended("tenant is suspended")
    if status in (ERASING, ERASED):
        raise TenantErased("tenant has been erased")


def require_can_create(tenant: _HasStatus) -> None:
    require_can_create_status(tenant.status)


def require_can_create_status(status: str) -> None:
    require_usable_status(status)
    if status == NOTICE:
        raise TenantInNotice("tenant is under end-of-contract notice")


def load_tenant(session: Session, tenant_id: str, *, lock: bool = False) -> Tenant:
    """The tenant row (locked FOR UPDATE on PostgreSQL when `lock`); NotFound if none."""
    tenant = session.get(Tenant, tenant_id, with_for_update=lock)
    if tenant is None:
        raise NotFound("no such tenant")
    return tenant


class TenantService:
    def __init__(self, *, db: Database, keyring: Keyring, clock: Clock, audit: AuditJournal):
        self._db, self._keyring, self._clock, self._audit = db, keyring, clock, audit

    def create(self, name: str) -> TenantView:
        """Create an active tenant with KEK generation 1 in the token.

        Raises InvalidRequest for a bad name, AlreadyExists for a name taken (after NFC
        normalisation and case folding)."""
        display, key = normalize_tenant_name(name)
        now = self._clock.now()
        tenant_id = f"t-{secrets.token_hex(8)}"
        try:
            with self._db.write() as s:
                if s.scalars(select(Tenant.id).where(Tenant.name_key == key)).first():
                    raise AlreadyExists("a tenant with this name exists", what="tenant")
                tenant = Tenant(id=tenant_id, name=display, name_key=key, status=ACTIVE, epoch=1,
                                created_at=now, updated_at=now)
                s.add(tenant)
                s.flush()
                self._keyring.create_kek(s, tenant_id=tenant_id, generation=1)
                self._audit.record(s, action="tenant.create", tenant_id=tenant_id,
                                   object=f"tenant:{tenant_id}")
                return _view(tenant)
        except IntegrityError as exc:
            raise AlreadyExists("a tenant with this name exists", what="tenant") from exc

    def list(self) -> list[TenantView]:
        with self._db.read() as s:
            return [_view(t) for t in s.scalars(select(Tenant).order_by(Tenant.created_at))]

    def show(self, tenant_id: str) -> TenantView:
        check_identifier(tenant_id, field="tenant_id")
        with self._db.read() as s:
            return _view(load_tenant(s, tenant_id), pending_notice(s, tenant_id))
