"""The erasure runner: takes each due tenant through persisted, idempotent steps.

    mark_erasing → destroy_keys → verify_absent → delete_data → certify → mark_erased

Each step's database effect and the move to the next step commit together; token
effects (destroy) are idempotent, so a crash anywhere is completed by the next run. A
named lock per tenant (flock beside SQLite, an advisory lock on PostgreSQL), which dies
with its holder, keeps two runners off the same tenant. A tenant is marked `erased`
only after a fresh search of the token (by CKA_ID and by label prefix) finds nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from hsm import HsmDestroyUnconfirmed, HsmError, Pkcs11Hsm
from kms import __version__
from kms.audit import AuditJournal
from kms.clock import Clock
from kms.db import Database, rowcount
from kms.errors import KeyIntegrityError, KmsError, NotFound, ServiceUnavailable
from kms.keyring import tenant_label_prefix
from kms.lifecycle import notice_digest, notice_is_genuine
from kms.locks import NamedLocks
from kms.models import (
    AppKey,
    AppKeyVersion,
    Certificate,
    DeletedVolume,
    Erasure,
    Kek,
    Notice,
    Principal,
    Tenant,
    Volume,
)
from kms.signing import SIGNATURE_ALGORITHM, ServiceSigner, canonical_json
from kms.tenants import ERASED, ERASING, load_tenant, pending_notice

log = logging.getLogger("kms.erasure")

RUNNER_ACTOR = "system:erasure-runner"
STEPS = ("mark_erasing", "destroy_keys", "verify_absent", "delete_data", "certify",
         "mark_erased")
METHOD = {
    "fr": "destruction des clés de chiffrement (SecNumCloud 19.4 a, 11.9)",
    "en": "destruction of the encryption keys (SecNumCloud 19.4 a, 11.9)",
}


class NoLongerDue(Exception):
    """The notice was cancelled (or replaced) after the runner claimed the tenant."""


@dataclass(frozen=True)
class Outcome:
    tenant_id: str
    state: str  # "erased" | "erasure_failed" | "skipped"
    error: str | None = None

    def public(self) -> dict[str, Any]:
        return {"tenant_id": self.tenant_id, "state": self.state, "error": self.error}


class ErasureRunner:
    def __init__(self, *, db: Database, hsm: Pkcs11Hsm, signer: ServiceSigner, clock: Clock,
                 audit: AuditJournal, drop_cached: Callable[[str], None],
                 after_step: Callable[[str, str], None] | None = None):
        self._db, self._hsm, self._signer, self._clock = db, hsm, signer, clock
        self._audit = audit
        self._drop_cached = drop_cached
        # Fault-injection seam for tests: called after each step has committed.
        self._after_step = after_step or (lambda tenant_id, step: None)
        self._locks = NamedLocks(db)

    # -- selection and claim --------------------------------------------------------

    def due_tenants(self) -> list[str]:
        now = self._clock.now()
        with self._db.read() as s:
            rows = s.execute(
                select(Notice.tenant_id).join(Tenant, Tenant.id == Notice.tenant_id)
                .where(Notice.cancelled_at.is_(None), Notice.effective_at <= now,
                       Tenant.status != ERASED)
                .order_by(Notice.effective_at)).scalars().all()
        return list(dict.fromkeys(rows))

    def run_due(self) -> list[Outcome]:
        """Erase every due tenant; failures are recorded and retried on the next run."""
        return [self.erase(tenant_id) for tenant_id in self.due_tenants()]

    def _claim(self, tenant_id: str) -> Erasure | None:
        """Record the attempt; None if the tenant is not (or no longer) due."""
        now = self._clock.now()
        with self._db.write() as s:
            tenant = s.get(Tenant, tenant_id)
            notice = pending_notice(s, tenant_id)
            if tenant is None or notice is None or tenant.status == ERASED \
                    or notice.effective_at > now:
                return None
            job = s.get(Erasure, tenant_id)
            if job is None:
                job = Erasure(tenant_id=tenant_id, notice_id=notice.id, state="running",
                              step=STEPS[0], started_at=now, attempts=0)
                s.add(job)
            elif job.notice_id != notice.id and job.step == STEPS[0]:
                # A cancelled notice's attempt that never began: start over for this one.
                job.notice_id, job.started_at, job.attempts = notice.id, now, 0
            job.attempts += 1
            job.state = "running"
            self._audit.record(s, action="erasure.start", tenant_id=tenant_id,
                               object=f"erasure:{tenant_id}:attempt={job.attempts}",
                               actor=RUNNER_ACTOR)
            s.flush()
            s.expunge(job)
            return job

    # -- the steps --------------------------------------------------------------------

    def erase(self, tenant_id: str) -> Outcome:
        """Take one due tenant through the remaining steps; "skipped" if another runner
        holds it or it is not due."""
        with self._locks.try_lock(f"erasure:{tenant_id}") as mine:
            if not mine:
                return Outcome(tenant_id, "skipped")
            return self._erase_locked(tenant_id)

    def _erase_locked(self, tenant_id: str) -> Outcome:
        try:
            job = self._claim(tenant_id)
            if job is None:
                return Outcome(tenant_id, "skipped")
            for step in STEPS[STEPS.index(job.step):]:
                getattr(self, f"_{step}")(tenant_id)
                self._after_step(tenant_id, step)
            log.info("tenant erased", extra={"tenant": tenant_id})
            return Outcome(tenant_id, "erased")
        except NoLongerDue:
            with self._db.write() as s:
                job = s.get(Erasure, tenant_id)
                if job is not None:
                    job.state = "cancelled"
            return Outcome(tenant_id, "skipped")
        except (HsmError, KmsError) as exc:
            reason = "destroy_unconfirmed" if isinstance(exc, HsmDestroyUnconfirmed) else (
                getattr(exc, "code", None) or type(exc).__name__)
            self._fail(tenant_id, reason)
            log.warning("erasure failed", extra={"tenant": tenant_id, "reason": reason})
            return Outcome(tenant_id, "erasure_failed", reason)

    def _advance(self, s: Session, tenant_id: str, step: str) -> Erasure:
        job = s.get(Erasure, tenant_id)
        assert job is not None
        self._audit.record(s, action=f"erasure.{step}", tenant_id=tenant_id,
                           object=f"erasure:{tenant_id}", actor=RUNNER_ACTOR)
        nxt = STEPS.index(step) + 1
        job.step = STEPS[nxt] if nxt < len(STEPS) else "done"
        return job

    def _fail(self, tenant_id: str, reason: str) -> None:
        """Record the failure; if even that cannot be written (journal or database
        down), nothing changes and the next run starts again from the recorded step."""
        try:
            with self._db.write() as s:
                job = s.get(Erasure, tenant_id)
                if job is not None:
                    job.state, job.last_error = "erasure_failed", reason
                    self._audit.record(s, action="erasure.failed", tenant_id=tenant_id,
                                       object=f"erasure:{tenant_id}:{reason}",
                                       outcome="failure", actor=RUNNER_ACTOR)
        except ServiceUnavailable:
            log.error("erasure failure not recorded", extra={"tenant": tenant_id})

    def _check_notice(self, s: Any, tenant_id: str, notice: Notice) -> None:
        """Before the point of no return: the row's columns are not trusted (a database
        write must not be able to erase a tenant or shorten its notice)."""
        if not notice_is_genuine(s, self._signer, notice, tenant_id, self._clock.now()):
            log.error("erasure refused: the notice is not a valid, served, uncancelled notice "
                      "signed by this service", extra={"tenant": tenant_id})
            raise KeyIntegrityError("the notice does not verify: erasure refused")

    def _mark_erasing(self, tenant_id: str) -> None:
        """The point of no return. Checked again here, under the tenant's row lock, so
        that a notice cancelled since the claim is never erased."""
        with self._db.write() as s:
            tenant = load_tenant(s, tenant_id, lock=True)
            notice = pending_notice(s, tenant_id)
            job = s.get(Erasure, tenant_id)
            if tenant.status not in (ERASING, ERASED) and (
                    notice is None or job is None or notice.id != job.notice_id
                    or notice.effective_at > self._clock.now()):
                raise NoLongerDue()
            if tenant.status not in (ERASING, ERASED):
                assert notice is not None
                self._check_notice(s, tenant_id, notice)
            tenant.status, tenant.epoch = ERASING, tenant.epoch + 1
            tenant.updated_at = self._clock.now()
            self._advance(s, tenant_id, "mark_erasing")
        self._drop_cached(tenant_id)

    def _destroy_keys(self, tenant_id: str) -> None:
        """One pass over the token destroys the tenant's KEKs (by CKA_ID, and by label)
        and every other object under its label prefix (usage counters, orphans). Each
        token operation costs time in proportion to the whole token (SoftHSM's file
        store), so this is one pass, not one search per object."""
        with self._db.read() as s:
            keks = [k.cka_id for k in s.scalars(select(Kek).where(Kek.tenant_id == tenant_id))]
        destroyed = self._hsm.destroy_objects(tenant_label_prefix(tenant_id),
                                              [bytes.fromhex(c) for c in keks])
        with self._db.write() as s:
            for kek in s.scalars(select(Kek).where(Kek.tenant_id == tenant_id)):
                if kek.state != "destroyed":
                    kek.state, kek.destroyed_at = "destroyed", self._clock.now()
            _record_ids(s.get(Erasure, tenant_id),
                        [o.cka_id.hex() if o.cka_id else f"{o.object_class}:{o.label}"
                         for o in destroyed] + keks)
            self._advance(s, tenant_id, "destroy_keys")

    def _verify_absent(self, tenant_id: str) -> None:
        """A fresh search of the whole token (new session): nothing under the tenant's
        label prefix, and none of the CKA_IDs ever recorded for it."""
        prefix = tenant_label_prefix(tenant_id)
        with self._db.read() as s:
            job = s.get(Erasure, tenant_id)
            assert job is not None
            ids = json.loads(job.destroyed_ids)
            known = [k.cka_id for k in s.scalars(select(Kek).where(Kek.tenant_id == tenant_id))]
        searched = sorted({i for i in ids if ":" not in i} | set(known))
        found = self._hsm.find_remaining(prefix, [bytes.fromhex(c) for c in searched])
        if found:
            # Something survived a destroy that reported success: destroy again next run.
            with self._db.write() as s:
                job = s.get(Erasure, tenant_id)
                assert job is not None
                job.step = "destroy_keys"
                for kek in s.scalars(select(Kek).where(Kek.tenant_id == tenant_id)):
                    if any(o.cka_id.hex() == kek.cka_id for o in found):
                        kek.state, kek.destroyed_at = "erasing", None
            raise HsmDestroyUnconfirmed(f"{len(found)} tenant object(s) remain in the token")
        check = {"result": "no object found", "searched_ids": len(searched),
                 "label_prefix": prefix, "checked_at": self._clock.now().isoformat()}
        with self._db.write() as s:
            self._advance(s, tenant_id, "verify_absent").absence_check = json.dumps(check)

    def _delete_data(self, tenant_id: str) -> None:
        with self._db.write() as s:
            key_ids = select(AppKey.id).where(AppKey.tenant_id == tenant_id)
            counts = {
                "app_key_versions": rowcount(s.execute(delete(AppKeyVersion).where(
                    AppKeyVersion.key_id.in_(key_ids)))),
                "app_keys": rowcount(s.execute(delete(AppKey).where(
                    AppKey.tenant_id == tenant_id))),
                "volumes": rowcount(s.execute(delete(Volume).where(
                    Volume.tenant_id == tenant_id))),
                "principals": rowcount(s.execute(delete(Principal).where(
                    Principal.tenant_id == tenant_id))),
                "deleted_volume_records": rowcount(s.execute(delete(DeletedVolume).where(
                    DeletedVolume.tenant_id == tenant_id))),
            }
            self._advance(s, tenant_id, "delete_data").deleted_counts = json.dumps(counts)

    def _certify(self, tenant_id: str) -> None:
        with self._db.write() as s:
            if s.get(Certificate, tenant_id) is None:
                body = canonical_json(self._certificate(s, tenant_id))
                s.add(Certificate(tenant_id=tenant_id, document=body,
                                  signature=self._signer.sign(s, body),
                                  created_at=self._clock.now()))
            self._advance(s, tenant_id, "certify")

    def _mark_erased(self, tenant_id: str) -> None:
        with self._db.write() as s:
            tenant = s.get(Tenant, tenant_id)
            assert tenant is not None
            tenant.status, tenant.epoch = ERASED, tenant.epoch + 1
            tenant.updated_at = self._clock.now()
            job = self._advance(s, tenant_id, "mark_erased")
            job.state, job.finished_at, job.last_error = "done", self._clock.now(), None

    def _certificate(self, s: Session, tenant_id: str) -> dict[str, Any]:
        tenant = s.get(Tenant, tenant_id)
        job = s.get(Erasure, tenant_id)
        notice = s.get(Notice, job.notice_id) if job else None
        assert tenant is not None and job is not None and notice is not None
        info = self._hsm.token_info()
        return {
            "kind": "kms.erasure-certificate", "format": 1,
            "tenant": {"id": tenant.id, "name": tenant.name},
            "notice": {"id": notice.id, "served_at": notice.served_at.isoformat(),
                       "effective_at": notice.effective_at.isoformat(),
                       "document_digest": notice_digest(notice.document)},
            "erasure": {"started_at": job.started_at.isoformat(),
                        "certified_at": self._clock.now().isoformat(), "method": METHOD},
            "token": {"manufacturer": info.manufacturer, "model": info.model,
                      "serial": info.serial, "label": info.label},
            "destroyed_objects": sorted(json.loads(job.destroyed_ids)),
            "deleted_rows": json.loads(job.deleted_counts),
            "absence_check": json.loads(job.absence_check or "null"),
            "signature": {"algorithm": SIGNATURE_ALGORITHM,
                          "key_fingerprint": self._signer.key_fingerprint(s)},
            "software": {"name": "tenant-kms", "version": __version__},
        }

    # -- reading results --------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        with self._db.read() as s:
            out = []
            for notice, tenant in s.execute(
                    select(Notice, Tenant).join(Tenant, Tenant.id == Notice.tenant_id)
                    .where(Notice.cancelled_at.is_(None)).order_by(Notice.effective_at)):
                job = s.get(Erasure, tenant.id)
                state = job.state if job else "scheduled"
                if state == "running":
                    with self._locks.try_lock(f"erasure:{tenant.id}") as free:
                        if free:  # no runner holds it: one died; the next run resumes
                            state = "interrupted"
                out.append({"tenant_id": tenant.id, "tenant_status": tenant.status,
                            "effective_at": notice.effective_at.isoformat(),
                            "state": "erased" if state == "done" else state,
                            "step": job.step if job else None,
                            "attempts": job.attempts if job else 0,
                            "last_error": job.last_error if job else None})
            return out

    def certificate(self, tenant_id: str) -> tuple[bytes, bytes]:
        with self._db.read() as s:
            cert = s.get(Certificate, tenant_id)
            if cert is None:
                raise NotFound("no certificate", what="certificate")
            return cert.document, cert.signature


def _record_ids(job: Erasure | None, ids: list[str]) -> None:
    assert job is not None
    job.destroyed_ids = json.dumps(sorted(set(json.loads(job.destroyed_ids)) | set(ids)))
