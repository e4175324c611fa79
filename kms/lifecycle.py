"""Tenant lifecycle (SecNumCloud 19.4): suspension and the end-of-contract notice.

States: active → notice → erasing → erased; notice → active by cancel; active ⇄
suspended. A tenant under notice may also be suspended: its notice stays pending and
`resume` brings it back to `notice`. Every state change bumps the tenant's epoch, which
invalidates every cached plaintext key of the tenant on every replica.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kms import __version__
from kms.audit import AuditJournal
from kms.clock import Clock, require_aware
from kms.config import MIN_NOTICE_DAYS
from kms.db import Database
from kms.errors import InvalidRequest, InvalidState, NotFound
from kms.models import AppKey, AuditEvent, Notice, Principal, Tenant, Volume
from kms.signing import SIGNATURE_ALGORITHM, ServiceSigner, canonical_json
from kms.tenants import (
    ACTIVE,
    ERASED,
    ERASING,
    NOTICE,
    SUSPENDED,
    load_tenant,
    pending_notice,
)
from kms.validation import check_identifier


def effective_at(*, served_at: datetime, notice_days: int, contract_end: date | None) -> datetime:
    """max(end of the contract's last day, served_at + notice_days × 24 h), in UTC.

    Raises ValueError for a naive `served_at`. The contract ends at the end of its last
    day (UTC), i.e. 00:00 UTC the day after."""
    served = require_aware(served_at)
    deadline = served + timedelta(days=notice_days)
    if contract_end is not None:
        try:
            end = datetime.combine(contract_end + timedelta(days=1), time(0),
                                   tzinfo=timezone.utc)
        except OverflowError:
            raise InvalidRequest("contract end out of range", field="contract_end") from None
        deadline = max(deadline, end)
    return deadline


@dataclass(frozen=True)
class NoticeView:
    id: str
    tenant_id: str
    served_at: datetime
    effective_at: datetime
    document: bytes
    signature: bytes

    def summary(self) -> dict[str, str]:
        return {"id": self.id, "served_at": self.served_at.isoformat(),
                "effective_at": self.effective_at.isoformat()}

    def public(self) -> dict[str, Any]:
        return {**self.summary(), "algorithm": SIGNATURE_ALGORITHM,
                "document": self.document.decode("utf-8"),
                "signature": base64.b64encode(self.signature).decode()}


def _nview(n: Notice) -> NoticeView:
    return NoticeView(n.id, n.tenant_id, n.served_at, n.effective_at, n.document, n.signature)


class LifecycleService:
    def __init__(self, *, db: Database, signer: ServiceSigner, clock: Clock, notice_days: int,
                 on_state_change: Any, audit: AuditJournal):
        self._db, self._signer, self._clock, self._audit = db, signer, clock, audit
        self._notice_days = notice_days
        self._on_state_change = on_state_change

    def _change(self, s: Session, tenant: Tenant, status: str, action: str) -> None:
        self._audit.record(s, action=action, tenant_id=tenant.id,
                           object=f"tenant:{tenant.id}:{tenant.status}->{status}")
        tenant.status = status
        tenant.epoch += 1
        tenant.updated_at = self._clock.now()
        self._on_state_change(tenant.id)

    def serve_notice(self, tenant_id: str, *, contract_end: date | None = None) -> NoticeView:
        """Serve the formal notice; the tenant enters `notice` (or stays suspended).

        Raises InvalidState if a notice is already pending or the tenant is erased."""
        check_identifier(tenant_id, field="tenant_id")
        served = require_aware(self._clock.now())
        deadline = effective_at(served_at=served, notice_days=self._notice_days,
                                contract_end=contract_end)
        with self._db.write() as s:
            tenant = load_tenant(s, tenant_id, lock=True)
            if tenant.status in (ERASING, ERASED, NOTICE) or pending_notice(s, tenant_id):
                raise InvalidState("tenant already under notice or erased")
            notice_id = f"n-{secrets.token_hex(8)}"
            doc = self._notice_document(s, tenant, notice_id, served, deadline, contract_end)
            body = canonical_json(doc)
            notice = Notice(id=notice_id, tenant_id=tenant_id, served_at=served,
                            effective_at=deadline,
                            contract_end=contract_end.isoformat() if contract_end else None,
                            document=body, signature=self._signer.sign(s, body))
            s.add(notice)
            self._audit.record(s, action="tenant.notice_served", tenant_id=tenant_id,
                               object=f"notice:{notice_id}:effective={deadline.isoformat()}")
            if tenant.status == ACTIVE:
                self._change(s, tenant, NOTICE, "tenant.offboard")
            return _nview(notice)

    def cancel_notice(self, tenant_id: str) -> dict[str, Any]:
        check_identifier(tenant_id, field="tenant_id")
        with self._db.write() as s:
            tenant = load_tenant(s, tenant_id, lock=True)
            notice = pending_notice(s, tenant_id)
            if notice is None or tenant.status in (ERASING, ERASED):
                raise InvalidState("no cancellable notice")
            notice.cancelled_at = self._clock.now()
            self._audit.record(s, action="tenant.notice_cancelled", tenant_id=tenant_id,
                               object=f"notice:{notice.id}")
            if tenant.status == NOTICE:
                self._change(s, tenant, ACTIVE, "tenant.cancel_offboard")
            return {"id": tenant.id, "status": tenant.status}

    def suspend(self, tenant_id: str) -> dict[str, Any]:
        check_identifier(tenant_id, field="tenant_id")
        with self._db.write() as s:
            tenant = load_tenant(s, tenant_id, lock=True)
            if tenant.status not in (ACTIVE, NOTICE):
                raise InvalidState("only an active tenant or one under notice can be suspended")
            self._change(s, tenant, SUSPENDED, "tenant.suspend")
            return {"id": tenant.id, "status": tenant.status}

    def resume(self, tenant_id: str) -> dict[str, Any]:
        check_identifier(tenant_id, field="tenant_id")
        with self._db.write() as s:
            tenant = load_tenant(s, tenant_id, lock=True)
            if tenant.status != SUSPENDED:
                raise InvalidState("tenant is not suspended")
            self._change(s, tenant, NOTICE if pending_notice(s, tenant_id) else ACTIVE,
                         "tenant.resume")
            return {"id": tenant.id, "status": tenant.status}

    def notice(self, tenant_id: str) -> NoticeView:
        """The pending (or executed) notice of a tenant; NotFound if none."""
        with self._db.read() as s:
            notice = pending_notice(s, tenant_id)
            if notice is None:
                raise NotFound("no notice", what="notice")
            return _nview(notice)

    def _notice_document(self, s: Session, tenant: Tenant, notice_id: str, served: datetime,
                         deadline: datetime, contract_end: date | None) -> dict[str, Any]:
        counts = {
            "volumes": _count(s, Volume, tenant.id),
            "application_keys": _count(s, AppKey, tenant.id),
            "principals": _count(s, Principal, tenant.id),
        }
        day = deadline.strftime("%Y-%m-%d %H:%M:%S UTC")
        return {
            "kind": "kms.end-of-contract-notice", "format": 1, "notice_id": notice_id,
            "tenant": {"id": tenant.id, "name": tenant.name},
            "served_at": served.isoformat(), "effective_at": deadline.isoformat(),
            "contract_end": contract_end.isoformat() if contract_end else None,
            "notice_period_days": self._notice_days,
            "scope": counts,
            "fr": {
                "objet": "Préavis de fin de contrat et d'effacement des données "
                         "(SecNumCloud 19.4)",
                "effacement": "Toutes les clés du locataire (clés de chiffrement de clés dans "
                              "le module de sécurité, clés de volumes, clés applicatives) "
                              "seront détruites, ainsi que ses identifiants d'accès et sa "
                              "configuration d'accès.",
                "methode": "Destruction des clés de chiffrement dans le module de sécurité "
                           "(effacement cryptographique, SecNumCloud 11.9 et 19.4 a) ; les "
                           "données chiffrées par ces clés deviennent irrécupérables.",
                "date": f"L'effacement aura lieu au plus tôt le {day}.",
                "restitution": "D'ici là, les clés existantes restent utilisables : "
                               "déchiffrez ou rechiffrez vos données et exportez votre journal "
                               "d'audit (GET /v1/tenant/audit). Aucune création n'est "
                               "possible pendant le préavis.",
            },
            "en": {
                "subject": "End-of-contract notice and data erasure (SecNumCloud 19.4)",
                "erasure": "Every key of the tenant (key-encryption keys in the security "
                           "module, volume keys, application keys) will be destroyed, with "
                           "its access credentials and access configuration.",
                "method": "Destruction of the encryption keys in the security module "
                          "(crypto-erasure, SecNumCloud 11.9 and 19.4 a); data encrypted "
                          "under them becomes unrecoverable.",
                "date": f"Erasure will take place no earlier than {day}.",
                "export": "Until then existing keys keep working: decrypt or re-encrypt your "
                          "data and export your audit trail (GET /v1/tenant/audit). Nothing "
                          "new can be created during the notice.",
            },
            "signature": {"algorithm": SIGNATURE_ALGORITHM,
                          "key_fingerprint": self._signer.key_fingerprint(s)},
            "software": {"name": "tenant-kms", "version": __version__},
        }


def _count(s: Session, model: Any, tenant_id: str) -> int:
    from sqlalchemy import func

    return int(s.scalar(select(func.count()).select_from(model)
                        .where(model.tenant_id == tenant_id)) or 0)


def parse_contract_end(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        parsed = date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest("contract end must be YYYY-MM-DD", field="contract_end") from None
    if parsed.year > 9000:
        raise InvalidRequest("contract end out of range", field="contract_end")
    return parsed


def notice_is_genuine(s: Session, signer: ServiceSigner, notice: Notice, tenant_id: str,
                      now: datetime) -> bool:
    """The notice is one this service signed (`_notice_document`) for this tenant and
    this notice id, due by its own signed dates, and its cancellation was never
    journaled."""
    try:
        ok = signer.verify(s, bytes(notice.document), bytes(notice.signature))
        doc = json.loads(bytes(notice.document))
        served = datetime.fromisoformat(doc["served_at"])
        due = datetime.fromisoformat(doc["effective_at"])
        period = timedelta(days=max(MIN_NOTICE_DAYS, int(doc.get("notice_period_days") or 0)))
        ok = ok and doc.get("kind") == "kms.end-of-contract-notice" \
            and doc.get("notice_id") == notice.id \
            and (doc.get("tenant") or {}).get("id") == tenant_id \
            and due - served >= period and due <= now
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    cancelled = s.scalar(select(func.count()).select_from(AuditEvent).where(
        AuditEvent.tenant_id == tenant_id, AuditEvent.action == "tenant.notice_cancelled",
        AuditEvent.object == f"notice:{notice.id}"))
    return ok and not cancelled


def notice_digest(document: bytes) -> str:
    return "sha256:" + hashlib.sha256(document).hexdigest()
