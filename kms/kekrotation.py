"""KEK rotation per tenant: a new generation in the token, every wrapped blob of the
tenant rewrapped under it, then the old generation destroyed — only after a fresh count
finds no blob that still points at it, and a fresh token search confirms it is gone.

Steps (persisted in the KEK rows, so a crash anywhere is completed by the next run):
    start   the active KEK becomes `retiring`; a new generation becomes `active`
    rewrap  batches of blobs move from retiring generations to the active one
    destroy each retiring generation with no reference left is destroyed in the token,
            then marked `destroyed`; deleted volumes it wrapped are now fully erased

This is also what completes the erasure of a single deleted volume (11.9): backups may
hold its wrapped key until the generation that wrapped it is destroyed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update

from hsm import HsmError, HsmUnavailable, Pkcs11Hsm
from kms.appkeys import key_place
from kms.audit import AuditJournal
from kms.clock import Clock
from kms.db import Database
from kms.errors import InvalidState, KeyIntegrityError, ServiceUnavailable
from kms.keyring import KeyPlace, Keyring, tenant_label_prefix
from kms.locks import NamedLocks
from kms.models import AppKey, AppKeyVersion, DeletedVolume, Kek, Tenant, Volume
from kms.tenants import ERASED, ERASING, load_tenant
from kms.validation import check_identifier

log = logging.getLogger("kms.kek")
BATCH = 200
ACTOR = "system:kek-rotation"


class KekStillReferenced(InvalidState):
    """A retiring KEK generation still wraps blobs: it may not be destroyed yet."""


@dataclass(frozen=True)
class RotationResult:
    tenant_id: str
    state: str  # "rotated" | "skipped"
    active_generation: int | None = None
    rewrapped: int = 0
    destroyed_generations: tuple[int, ...] = ()

    def public(self) -> dict[str, object]:
        return {"tenant_id": self.tenant_id, "state": self.state,
                "active_generation": self.active_generation, "rewrapped": self.rewrapped,
                "destroyed_generations": list(self.destroyed_generations)}


class KekRotation:
    def __init__(self, *, db: Database, hsm: Pkcs11Hsm, keyring: Keyring, clock: Clock,
                 audit: AuditJournal, period: timedelta,
                 after_step: Callable[[str, str], None] | None = None):
        self._db, self._hsm, self._keyring, self._clock = db, hsm, keyring, clock
        self._audit, self.period = audit, period
        self._locks = NamedLocks(db)
        # Fault-injection seam for tests: called after each committed step.
        self._after_step = after_step or (lambda tenant_id, step: None)

    def rotate(self, tenant_id: str, *, start_new: bool = True) -> RotationResult:
        """Rotate (or finish an interrupted rotation of) one tenant's KEK."""
        check_identifier(tenant_id, field="tenant_id")
        with self._locks.try_lock(f"kek-rotation:{tenant_id}") as mine:
            if not mine:
                return RotationResult(tenant_id, "skipped")
            try:
                return self._rotate_locked(tenant_id, start_new)
            except HsmUnavailable as exc:
                raise ServiceUnavailable("the security token is unavailable") from exc

    def _rotate_locked(self, tenant_id: str, start_new: bool) -> RotationResult:
        with self._db.write() as s:
            tenant = load_tenant(s, tenant_id)
            if tenant.status in (ERASING, ERASED):
                raise InvalidState("the tenant is being erased")
            retiring = s.scalars(select(Kek).where(Kek.tenant_id == tenant_id,
                                                   Kek.state == "retiring")).first()
            if retiring is None and start_new:
                for kek in s.scalars(select(Kek).where(Kek.tenant_id == tenant_id,
                                                       Kek.state == "active")):
                    kek.state = "retiring"
                new = self._keyring.create_kek(
                    s, tenant_id=tenant_id,
                    generation=self._keyring.next_generation(s, tenant_id))
                self._audit.record(s, action="kek.rotate_start", tenant_id=tenant_id,
                                   object=f"kek:{tenant_id}:gen={new.generation}", actor=ACTOR)
        self._after_step(tenant_id, "start")
        rewrapped = self._rewrap_all(tenant_id)
        self._after_step(tenant_id, "rewrap")
        destroyed = self._destroy_retired(tenant_id)
        with self._db.read() as s:
            active = self._keyring.current_kek(s, tenant_id).generation
        return RotationResult(tenant_id, "rotated", active, rewrapped, tuple(destroyed))

    def _retiring(self, s: object, tenant_id: str) -> list[int]:
        return list(s.scalars(select(Kek.generation).where(  # type: ignore[attr-defined]
            Kek.tenant_id == tenant_id, Kek.state == "retiring")))

    def _rewrap_all(self, tenant_id: str) -> int:
        total = 0
        while True:
            with self._db.write() as s:
                old_gens = self._retiring(s, tenant_id)
                if not old_gens:
                    return total
                target = self._keyring.current_kek(s, tenant_id)
                volumes = list(s.scalars(select(Volume).where(
                    Volume.tenant_id == tenant_id, Volume.kek_generation.in_(old_gens))
                    .limit(BATCH)))
                versions = list(s.execute(
                    select(AppKeyVersion, AppKey.name).join(AppKey,
                                                            AppKey.id == AppKeyVersion.key_id)
                    .where(AppKey.tenant_id == tenant_id,
                           AppKeyVersion.kek_generation.in_(old_gens))
                    .limit(BATCH)).all())
                if not volumes and not versions:
                    return total
                for v in volumes:
                    v.wrapped_key = self._move(s, tenant_id, v.kek_generation, target,
                                               KeyPlace(tenant_id, "volume", v.volume_id, 1),
                                               v.wrapped_key)
                    v.kek_generation = target.generation
                for row, name in versions:
                    if row.wrapped_key:  # a destroyed version has nothing left to move
                        row.wrapped_key = self._move(s, tenant_id, row.kek_generation, target,
                                                     key_place(tenant_id, name, row.version),
                                                     row.wrapped_key)
                    row.kek_generation = target.generation
                n = len(volumes) + len(versions)
                total += n
                self._audit.record(s, action="kek.rewrap", tenant_id=tenant_id,
                                   object=f"kek:{tenant_id}:to={target.generation}:n={n}",
                                   actor=ACTOR)

    def _move(self, s: object, tenant_id: str, generation: int, target: Kek, place: KeyPlace,
              blob: bytes) -> bytes:
        old = self._keyring.kek(s, tenant_id, generation)  # type: ignore[arg-type]
        return self._keyring.wrap(target, place, self._keyring.unwrap(old, place, blob))

    def references(self, tenant_id: str, generation: int) -> int:
        """A fresh count of the blobs that still point at a generation."""
        with self._db.read() as s:
            vols = s.scalar(select(func.count()).select_from(Volume).where(
                Volume.tenant_id == tenant_id, Volume.kek_generation == generation))
            vers = s.scalar(select(func.count()).select_from(AppKeyVersion).join(
                AppKey, AppKey.id == AppKeyVersion.key_id).where(
                AppKey.tenant_id == tenant_id, AppKeyVersion.kek_generation == generation))
            return int(vols or 0) + int(vers or 0)

    def _destroy_retired(self, tenant_id: str) -> list[int]:
        destroyed = []
        with self._db.read() as s:
            retiring = [(k.generation, k.cka_id) for k in s.scalars(select(Kek).where(
                Kek.tenant_id == tenant_id, Kek.state == "retiring"))]
        for generation, cka_hex in retiring:
            self.destroy_generation(tenant_id, generation, cka_hex)
            destroyed.append(generation)
        return destroyed

    def destroy_generation(self, tenant_id: str, generation: int, cka_hex: str) -> None:
        """Refused (KekStillReferenced) while any blob points at the generation."""
        remaining = self.references(tenant_id, generation)
        if remaining:
            raise KekStillReferenced(f"{remaining} blob(s) still wrapped by generation "
                                     f"{generation}")
        try:
            # The generation's own object only: its label is fixed at creation, and the
            # row's CKA_ID (from the database) must name it, not the active generation.
            prefix = tenant_label_prefix(tenant_id)
            self._hsm.destroy(bytes.fromhex(cka_hex), within=prefix,
                              label=f"{prefix}kek/{generation}")
        except HsmError as exc:
            raise ServiceUnavailable("the token did not confirm the destruction") from exc
        self._after_step(tenant_id, "destroy")
        now = self._clock.now()
        with self._db.write() as s:
            kek = s.scalars(select(Kek).where(Kek.tenant_id == tenant_id,
                                              Kek.generation == generation)).one()
            kek.state, kek.destroyed_at = "destroyed", now
            s.execute(update(DeletedVolume).where(
                DeletedVolume.tenant_id == tenant_id, DeletedVolume.kek_generation == generation,
                DeletedVolume.erasure_completed_at.is_(None)).values(erasure_completed_at=now))
            self._audit.record(s, action="kek.destroy", tenant_id=tenant_id,
                               object=f"kek:{tenant_id}:gen={generation}:{cka_hex}",
                               actor=ACTOR)

    # -- schedule -----------------------------------------------------------------------

    def due(self) -> list[str]:
        """Tenants whose active KEK is older than the period, or with a rotation to finish."""
        cutoff = self._clock.now() - self.period
        with self._db.read() as s:
            rows = s.execute(select(Kek.tenant_id).join(Tenant, Tenant.id == Kek.tenant_id)
                             .where(Tenant.status.not_in((ERASING, ERASED)))
                             .where(((Kek.state == "active") & (Kek.created_at <= cutoff))
                                    | (Kek.state == "retiring"))).scalars().all()
        return sorted(set(rows))

    def run_due(self) -> list[RotationResult]:
        out = []
        for tenant_id in self.due():
            try:
                out.append(self.rotate(tenant_id))
            except (InvalidState, ServiceUnavailable, KeyIntegrityError) as exc:
                log.warning("KEK rotation failed", extra={"tenant": tenant_id,
                                                          "reason": exc.code})
        return out

    def complete_by(self, kek: Kek) -> datetime:
        """When the next scheduled rotation will have destroyed this generation."""
        return max(self._clock.now(), kek.created_at + self.period)
