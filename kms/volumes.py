"""Volume keys for storage hypervisors (LUKS, dm-crypt, QEMU-LUKS).

A volume key is random bytes from the OS CSPRNG, wrapped by the tenant's KEK inside the
token; only the wrapped blob is stored. Fetching the key unwraps it for the caller.

A released key is kept in the process's memory for a bounded time (`cache_seconds`,
60 s by default; 0 keeps none), so that a key fetched again (a boot storm, a retry, a
volume attached on several hosts) skips the token. Each fetch still reads the volume's
row first, so the cache serves only what the database would release now: an entry is
found only under the same tenant epoch (every state change bumps it, and drops the
tenant's entries in this process), the same wrapped blob (a volume deleted and created
again, or rewrapped by a KEK rotation, misses) and the same KEK. Deleting a volume drops
its entry at once in this process; other processes forget it at their next periodic
sweep (`sweep_cache`), at the latest when its time runs out.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kms.audit import AuditJournal, Requirement
from kms.audit_batch import AuditBatcher
from kms.caller import ROLE_HYPERVISOR, Caller
from kms.clock import Clock
from kms.db import Database
from kms.errors import (
    AlreadyExists,
    InvalidRequest,
    KeyIntegrityError,
    NotFound,
    Unauthenticated,
)
from kms.keycache import KeyCache
from kms.keyring import KeyPlace, Keyring
from kms.models import DeletedVolume, Kek, Volume
from kms.principals import LIVE_PRINCIPAL_SQL
from kms.secret import SecretBytes
from kms.tenants import (
    load_tenant,
    require_can_create,
    require_can_create_status,
    require_usable,
    require_usable_status,
)
from kms.validation import check_identifier

# cipher -> allowed key sizes in bits (XTS uses two keys: 512 bits = AES-256-XTS)
CIPHERS: dict[str, tuple[int, ...]] = {"aes-xts-plain64": (256, 512)}


@dataclass(frozen=True)
class VolumeView:
    volume_id: str
    cipher: str
    key_bits: int
    created_at: datetime

    def public(self) -> dict[str, object]:
        return {"volume_id": self.volume_id, "cipher": self.cipher, "key_bits": self.key_bits,
                "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class VolumeKey:
    volume_id: str
    cipher: str
    key_bits: int
    key: SecretBytes


def _place(tenant_id: str, volume_id: str) -> KeyPlace:
    return KeyPlace(tenant_id, "volume", volume_id, 1)


_FETCH = ("SELECT t.status, t.epoch, v.volume_id, v.cipher, v.key_bits, v.wrapped_key, k.cka_id, "
          "k.state, v.created_at, v.kek_generation FROM tenants t "
          "LEFT JOIN volumes v ON v.tenant_id = t.id AND v.volume_id = ? "
          "LEFT JOIN keks k ON k.tenant_id = t.id AND k.generation = v.kek_generation "
          "WHERE t.id = ?")


_TENANT_FOR_CREATE = "SELECT status FROM tenants WHERE id = ?"
_VOLUME_EXISTS = "SELECT 1 FROM volumes WHERE tenant_id = ? AND volume_id = ?"
# A key release's event is committed only if, under the journal's lock, the tenant is
# still usable, the caller's principal not revoked, and the volume still the one whose key
# was read: same creation time, and the same wrapped key unless a KEK rotation rewrapped
# it (another generation). A volume deleted and created again under the same id is
# another volume with another key.
_STILL_RELEASABLE = ("SELECT t.status, v.created_at, v.wrapped_key, v.kek_generation, "
                     f"{LIVE_PRINCIPAL_SQL} FROM tenants t "
                     "LEFT JOIN volumes v ON v.tenant_id = t.id AND v.volume_id = ? "
                     "WHERE t.id = ?")
_CURRENT_KEK = ("SELECT generation, cka_id, encryptions FROM keks "
                "WHERE tenant_id = ? AND state = 'active' ORDER BY generation DESC LIMIT 1")
_COUNT_KEK_USE = ("UPDATE keks SET encryptions = encryptions + 1 "
                  "WHERE tenant_id = ? AND generation = ?")
_INSERT_VOLUME = ("INSERT INTO volumes (tenant_id, volume_id, cipher, key_bits, "
                  "kek_generation, wrapped_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)")


def _live_volume(s: Session, caller: Caller, volume_id: str) -> Volume:
    """The caller's tenant's volume; NotFound for another tenant's, as for none."""
    require_usable(load_tenant(s, caller.tenant_id))
    volume = s.get(Volume, (caller.tenant_id, volume_id))
    if volume is None:
        raise NotFound("no such volume", what="volume")
    return volume


def _view(v: Volume) -> VolumeView:
    return VolumeView(v.volume_id, v.cipher, v.key_bits, v.created_at)


class VolumeService:
    def __init__(self, *, db: Database, keyring: Keyring, clock: Clock, audit: AuditJournal,
                 batcher: AuditBatcher, rotation_period: timedelta = timedelta(days=90),
                 cache_size: int = 10_000, cache_seconds: float = 60.0):
        self._db, self._keyring, self._clock = db, keyring, clock
        self._audit, self._batcher = audit, batcher
        self._rotation_period = rotation_period
        # (tenant, volume id, wrapped blob, KEK CKA_ID, tenant epoch) -> the key
        self._cache: KeyCache[bytes] = KeyCache(cache_size, ttl=cache_seconds)

    def __repr__(self) -> str:
        return f"VolumeService(cache={self._cache!r})"

    def drop_cached(self, tenant_id: str) -> None:
        self._cache.drop(tenant_id)

    def sweep_cache(self) -> int:
        """Forget expired keys, those of tenants whose state changed in another process,
        and those whose volume is no longer the one the key was released for: deleted
        (by another replica, or while this process was releasing it) or rewrapped by a
        KEK rotation. Such a key is never served again (the volume's row is read on every
        fetch); the sweep keeps it from lingering in memory until its time limit.
        Returns how many were dropped."""
        dropped = self._cache.sweep(self._db)[0]
        held: dict[str, list[str]] = {}
        for k in self._cache.keys():
            held.setdefault(str(k[0]), []).append(str(k[1]))
        if not held:
            return dropped
        live: set[tuple[str, str, bytes]] = set()
        with self._db.read() as s:
            for tenant_id, volume_ids in held.items():
                for i in range(0, len(volume_ids), 500):
                    rows = s.execute(
                        select(Volume.volume_id, Volume.wrapped_key).where(
                            Volume.tenant_id == tenant_id,
                            Volume.volume_id.in_(volume_ids[i:i + 500])))
                    live.update((tenant_id, v, bytes(w)) for v, w in rows)
        return dropped + self._cache.drop_where(
            lambda k: (k[0], k[1], k[2]) not in live)

    def create(self, caller: Caller, *, volume_id: str, cipher: str, key_bits: int) -> VolumeView:
        """Create a volume and its key. Raises AlreadyExists if the id is taken."""
        caller.require(ROLE_HYPERVISOR)
        check_identifier(volume_id, field="volume_id")
        if cipher not in CIPHERS:
            raise InvalidRequest(f"cipher must be one of {', '.join(CIPHERS)}", field="cipher")
        if key_bits not in CIPHERS[cipher]:
            raise InvalidRequest("key_bits not allowed for this cipher", field="key_bits")
        key = os.urandom(key_bits // 8)
        view = self._create_direct(caller, volume_id, cipher, key_bits, key)
        return view if view is not None else self._create_orm(caller, volume_id, cipher,
                                                              key_bits, key)

    def _create_direct(self, caller: Caller, volume_id: str, cipher: str, key_bits: int,
                       key: bytes) -> VolumeView | None:
        """The common case in plain DB-API (SQLAlchemy's ORM was two thirds of it): one
        transaction reads the tenant and its current KEK, wraps the key in the token,
        counts the KEK's use, inserts the volume and its journal event. None when the KEK
        is at its cap (`_create_orm` rolls a new generation over)."""
        db, tenant_id = self._db, caller.tenant_id
        now = self._clock.now()
        try:
            with db.raw_write() as cur:
                cur.execute(db.sql(_TENANT_FOR_CREATE) + ("" if db.is_sqlite else
                                                          " FOR SHARE"), (tenant_id,))
                tenant = cur.fetchone()
                if tenant is None:
                    raise NotFound("no such tenant")
                require_can_create_status(tenant[0])
                cur.execute(db.sql(_VOLUME_EXISTS), (tenant_id, volume_id))
                if cur.fetchone() is not None:
                    raise AlreadyExists("volume exists", what="volume")
                cur.execute(db.sql(_CURRENT_KEK), (tenant_id,))
                kek = cur.fetchone()
                if kek is None or kek[2] >= self._keyring.kek_cap:
                    return None
                generation, kek_cka_id, _count = kek
                wrapped = self._keyring.wrap_with(kek_cka_id, _place(tenant_id, volume_id),
                                                  key)
                cur.execute(db.sql(_COUNT_KEK_USE), (tenant_id, generation))
                cur.execute(db.sql(_INSERT_VOLUME), (tenant_id, volume_id, cipher, key_bits,
                                                     generation, wrapped, db.bind_time(now)))
                mark = self._audit.append_cursor(cur, db, [self._audit.pending(
                    action="volume.create", tenant_id=tenant_id, object=f"volume:{volume_id}",
                    actor=caller.actor)])
        except db.integrity_error as exc:  # a concurrent create of the same id
            raise AlreadyExists("volume exists", what="volume") from exc
        self._audit.anchor(mark)
        return VolumeView(volume_id, cipher, key_bits, now)

    def _create_orm(self, caller: Caller, volume_id: str, cipher: str, key_bits: int,
                    key: bytes) -> VolumeView:
        try:
            with self._db.write() as s:
                require_can_create(load_tenant(s, caller.tenant_id))
                if s.get(Volume, (caller.tenant_id, volume_id)) is not None:
                    raise AlreadyExists("volume exists", what="volume")
                kek = self._keyring.current_kek(s, caller.tenant_id)
                wrapped = self._keyring.wrap(kek, _place(caller.tenant_id, volume_id), key)
                volume = Volume(tenant_id=caller.tenant_id, volume_id=volume_id, cipher=cipher,
                                key_bits=key_bits, kek_generation=kek.generation,
                                wrapped_key=wrapped, created_at=self._clock.now())
                s.add(volume)
                s.flush()
                self._audit.record(s, action="volume.create", tenant_id=caller.tenant_id,
                                   object=f"volume:{volume_id}", actor=caller.actor)
                return _view(volume)
        except IntegrityError as exc:
            raise AlreadyExists("volume exists", what="volume") from exc

    def list(self, caller: Caller) -> list[VolumeView]:
        caller.require(ROLE_HYPERVISOR)
        with self._db.read() as s:
            require_usable(load_tenant(s, caller.tenant_id))
            rows = s.scalars(select(Volume).where(Volume.tenant_id == caller.tenant_id)
                             .order_by(Volume.created_at, Volume.volume_id))
            return [_view(v) for v in rows]

    def fetch_key(self, caller: Caller, volume_id: str) -> VolumeKey:
        """Unwrap and return the volume key. NotFound for another tenant's volume."""
        caller.require(ROLE_HYPERVISOR)
        check_identifier(volume_id, field="volume_id")
        # One query: the tenant's state, the volume and the KEK that wrapped its key.
        row = self._db.fetchone(self._db.sql(_FETCH), (volume_id, caller.tenant_id))
        if row is None:
            raise NotFound("no such tenant")
        (status, epoch, found, cipher, key_bits, wrapped, kek_cka_id, kek_state, created_at,
         generation) = row
        require_usable_status(status)
        if found is None:
            raise NotFound("no such volume", what="volume")
        if kek_cka_id is None or kek_state == "destroyed":
            raise KeyIntegrityError("KEK generation missing or destroyed")
        wrapped = bytes(wrapped)
        cache_key = (caller.tenant_id, volume_id, wrapped, kek_cka_id, epoch)
        key = self._cache.get(cache_key)
        if key is None:
            key = self._keyring.unwrap_with(kek_cka_id, _place(caller.tenant_id, volume_id),
                                            wrapped)
            self._cache.put(cache_key, key)
        released = VolumeKey(found, cipher, key_bits, SecretBytes(key))
        # No key leaves before its release is in the journal.
        # and none after the volume's deletion has committed: the event is written only
        # if the volume is still there under the journal's lock (the deletion's own
        # event takes that lock too).
        self._batcher.submit(self._audit.pending(
            action="volume.key_fetch", tenant_id=caller.tenant_id,
            object=f"volume:{volume_id}", actor=caller.actor,
            requires=Requirement(_STILL_RELEASABLE,
                                 (caller.principal_id, volume_id, caller.tenant_id),
                                 functools.partial(_still_releasable, created_at,
                                                   wrapped, generation))))
        return released

    def delete(self, caller: Caller, volume_id: str) -> dict[str, Any]:
        """Delete the volume and its wrapped key at once. Returns the erasure status:
        complete when the KEK generation that wrapped the key is destroyed (backups may
        hold the blob until then), which the next KEK rotation does."""
        caller.require(ROLE_HYPERVISOR)
        check_identifier(volume_id, field="volume_id")
        with self._db.write() as s:
            volume = _live_volume(s, caller, volume_id)
            record = DeletedVolume(tenant_id=caller.tenant_id, volume_id=volume_id,
                                   kek_generation=volume.kek_generation,
                                   deleted_at=self._clock.now())
            s.add(record)
            s.delete(volume)
            self._audit.record(s, action="volume.delete", tenant_id=caller.tenant_id,
                               object=f"volume:{volume_id}", actor=caller.actor)
            s.flush()
            out = self._deleted_status(s, record)
        self._cache.drop_where(lambda k: k[0] == caller.tenant_id and k[1] == volume_id)
        return out

    def status(self, caller: Caller, volume_id: str) -> dict[str, Any]:
        """A live volume's metadata, or a deleted one's erasure status."""
        caller.require(ROLE_HYPERVISOR)
        check_identifier(volume_id, field="volume_id")
        with self._db.read() as s:
            require_usable(load_tenant(s, caller.tenant_id))
            volume = s.get(Volume, (caller.tenant_id, volume_id))
            if volume is not None:
                return {**_view(volume).public(), "status": "active"}
            record = s.scalars(select(DeletedVolume).where(
                DeletedVolume.tenant_id == caller.tenant_id,
                DeletedVolume.volume_id == volume_id)
                .order_by(DeletedVolume.id.desc()).limit(1)).first()
            if record is None:
                raise NotFound("no such volume", what="volume")
            return self._deleted_status(s, record)

    def _deleted_status(self, s: Session, record: DeletedVolume) -> dict[str, Any]:
        out: dict[str, Any] = {"volume_id": record.volume_id, "status": "deleted",
                               "deleted_at": record.deleted_at.isoformat()}
        if record.erasure_completed_at is not None:
            out["erasure"] = {"status": "complete",
                              "completed_at": record.erasure_completed_at.isoformat(),
                              "kek_generation": record.kek_generation}
            return out
        kek = s.scalars(select(Kek).where(Kek.tenant_id == record.tenant_id,
                                          Kek.generation == record.kek_generation)).one()
        due = max(self._clock.now(), kek.created_at + self._rotation_period)
        out["erasure"] = {"status": "pending_kek_rotation",
                          "kek_generation": record.kek_generation,
                          "complete_by": due.isoformat()}
        return out


def _still_releasable(created_at: Any, wrapped: bytes, generation: Any,
                      row: tuple[Any, ...] | None) -> None:
    """The check of `_STILL_RELEASABLE`: raises as `fetch_key` would now."""
    if row is None:
        raise NotFound("no such tenant")
    status, now_created_at, now_wrapped, now_generation, principal_live = row
    require_usable_status(status)
    if not principal_live:
        raise Unauthenticated("principal revoked")
    if now_created_at is None or now_created_at != created_at:
        raise NotFound("no such volume", what="volume")
    if bytes(now_wrapped) != wrapped and now_generation == generation:
        # Another key under the same generation and creation time: created again within
        # one clock tick.
        raise NotFound("no such volume", what="volume")
