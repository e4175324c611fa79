"""Application keys and their versions (after NIST SP 800-57 and Vault Transit).

Version states:
  active       the latest version: encrypts and decrypts
  deactivated  an older version: decrypts only
  suspended    temporarily unusable (reversible)
  compromised  refused for encrypt and decrypt; may only be rewrapped to the latest
               version, and the key is flagged `rewrap_required`
  destroyed    the wrapped material is deleted: irreversible

Each version's 256-bit key is wrapped by the tenant KEK in the token; every transition
is journaled in the transaction that makes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kms import aead
from kms.audit import AuditJournal
from kms.caller import ROLE_APP, ROLE_TENANT_ADMIN, Caller
from kms.clock import Clock
from kms.db import Database
from kms.errors import AlreadyExists, InvalidRequest, InvalidState, NotFound
from kms.keyring import KeyPlace, Keyring
from kms.models import AppKey, AppKeyVersion
from kms.tenants import load_tenant, require_can_create, require_usable
from kms.validation import check_identifier

KEY_TYPES = ("aes256-gcm",)
ACTIVE, DEACTIVATED, SUSPENDED = "active", "deactivated", "suspended"
COMPROMISED, DESTROYED = "compromised", "destroyed"
VERSION_STATES = (ACTIVE, DEACTIVATED, SUSPENDED, COMPROMISED, DESTROYED)
DECRYPTABLE = (ACTIVE, DEACTIVATED)
REWRAPPABLE = (ACTIVE, DEACTIVATED, COMPROMISED)


@dataclass(frozen=True)
class KeyView:
    name: str
    type: str
    latest_version: int
    min_decryption_version: int
    enabled: bool
    created_at: datetime
    versions: tuple[dict[str, Any], ...] = ()

    def public(self) -> dict[str, object]:
        return {"name": self.name, "type": self.type, "latest_version": self.latest_version,
                "min_decryption_version": self.min_decryption_version,
                "enabled": self.enabled, "created_at": self.created_at.isoformat(),
                "rewrap_required": any(v["state"] == COMPROMISED for v in self.versions),
                "versions": list(self.versions)}


def key_place(tenant_id: str, name: str, version: int) -> KeyPlace:
    return KeyPlace(tenant_id, "appkey", name, version)


def find_key(s: Session, tenant_id: str, name: str) -> AppKey | None:
    return s.scalars(select(AppKey).where(AppKey.tenant_id == tenant_id,
                                          AppKey.name == name)).first()


def get_key(s: Session, tenant_id: str, name: str) -> AppKey:
    key = find_key(s, tenant_id, name)
    if key is None:
        raise NotFound("no such key", what="key")
    return key


class AppKeyService:
    def __init__(self, *, db: Database, keyring: Keyring, clock: Clock, audit: AuditJournal):
        self._db, self._keyring, self._clock, self._audit = db, keyring, clock, audit

    def _view(self, s: Session, k: AppKey) -> KeyView:
        versions = tuple(
            {"version": v.version, "state": v.state, "created_at": v.created_at.isoformat()}
            for v in s.scalars(select(AppKeyVersion).where(AppKeyVersion.key_id == k.id)
                               .order_by(AppKeyVersion.version)))
        return KeyView(k.name, k.type, k.latest_version, k.min_decryption_version, k.enabled,
                       k.created_at, versions)

    def create(self, caller: Caller, *, name: str, key_type: str) -> KeyView:
        caller.require(ROLE_TENANT_ADMIN)
        check_identifier(name, field="name")
        if key_type not in KEY_TYPES:
            raise InvalidRequest(f"type must be one of {', '.join(KEY_TYPES)}", field="type")
        try:
            with self._db.write() as s:
                require_can_create(load_tenant(s, caller.tenant_id))
                if find_key(s, caller.tenant_id, name) is not None:
                    raise AlreadyExists("key exists", what="key")
                row = AppKey(tenant_id=caller.tenant_id, name=name, type=key_type,
                             latest_version=0, min_decryption_version=1, enabled=True,
                             created_at=self._clock.now())
                s.add(row)
                s.flush()
                self.add_version(s, caller.tenant_id, row)
                self._audit.record(s, action="key.create", tenant_id=caller.tenant_id,
                                   object=f"key:{name}", actor=caller.actor)
                return self._view(s, row)
        except IntegrityError as exc:
            raise AlreadyExists("key exists", what="key") from exc

    def add_version(self, s: Session, tenant_id: str, key: AppKey) -> AppKeyVersion:
        """A new latest version (fresh random key, wrapped in the token); the previous
        latest, if active, becomes deactivated (decrypt only)."""
        previous = s.get(AppKeyVersion, (key.id, key.latest_version))
        if previous is not None and previous.state == ACTIVE:
            previous.state, previous.state_changed_at = DEACTIVATED, self._clock.now()
        key.latest_version += 1
        kek = self._keyring.current_kek(s, tenant_id)
        wrapped = self._keyring.wrap(kek, key_place(tenant_id, key.name, key.latest_version),
                                     os.urandom(aead.KEY_BYTES))
        row = AppKeyVersion(key_id=key.id, version=key.latest_version,
                            kek_generation=kek.generation, wrapped_key=wrapped, state=ACTIVE,
                            encryptions=0, created_at=self._clock.now())
        s.add(row)
        s.flush()
        return row

    def list(self, caller: Caller) -> list[KeyView]:
        caller.require(ROLE_TENANT_ADMIN, ROLE_APP)
        with self._db.read() as s:
            require_usable(load_tenant(s, caller.tenant_id))
            rows = s.scalars(select(AppKey).where(AppKey.tenant_id == caller.tenant_id)
                             .order_by(AppKey.name))
            return [self._view(s, k) for k in rows]

    def show(self, caller: Caller, name: str) -> KeyView:
        caller.require(ROLE_TENANT_ADMIN, ROLE_APP)
        check_identifier(name, field="name")
        with self._db.read() as s:
            require_usable(load_tenant(s, caller.tenant_id))
            return self._view(s, get_key(s, caller.tenant_id, name))

    def rotate(self, caller: Caller, name: str) -> KeyView:
        """A new version becomes the latest. A new version is something new: refused
        under notice (409 tenant_in_notice), like new keys and volumes."""
        caller.require(ROLE_TENANT_ADMIN)
        check_identifier(name, field="name")
        with self._db.write() as s:
            require_can_create(load_tenant(s, caller.tenant_id))
            key = get_key(s, caller.tenant_id, name)
            self.add_version(s, caller.tenant_id, key)
            self._audit.record(s, action="key.rotate", tenant_id=caller.tenant_id,
                               object=f"key:{name}:v{key.latest_version}", actor=caller.actor)
            return self._view(s, key)

    def update(self, caller: Caller, name: str, *, min_decryption_version: int | None = None,
               enabled: bool | None = None) -> KeyView:
        caller.require(ROLE_TENANT_ADMIN)
        check_identifier(name, field="name")
        if min_decryption_version is None and enabled is None:
            raise InvalidRequest("give min_decryption_version or enabled", field="enabled")
        with self._db.write() as s:
            require_usable(load_tenant(s, caller.tenant_id))
            key = get_key(s, caller.tenant_id, name)
            if min_decryption_version is not None:
                if not 1 <= min_decryption_version <= key.latest_version:
                    raise InvalidRequest("min_decryption_version must be between 1 and the "
                                         "latest version", field="min_decryption_version")
                key.min_decryption_version = min_decryption_version
            if enabled is not None:
                key.enabled = enabled
            self._audit.record(s, action="key.update", tenant_id=caller.tenant_id,
                               object=f"key:{name}:min={key.min_decryption_version}:"
                                      f"enabled={key.enabled}", actor=caller.actor)
            return self._view(s, key)

    def set_version_state(self, caller: Caller, name: str, version: int, state: str) -> KeyView:
        """Suspend, resume (`active`), mark compromised or destroy one version."""
        caller.require(ROLE_TENANT_ADMIN)
        check_identifier(name, field="name")
        if state not in (ACTIVE, SUSPENDED, COMPROMISED, DESTROYED):
            raise InvalidRequest("state must be active, suspended, compromised or destroyed",
                                 field="state")
        with self._db.write() as s:
            require_usable(load_tenant(s, caller.tenant_id))
            key = get_key(s, caller.tenant_id, name)
            row = s.get(AppKeyVersion, (key.id, version))
            if row is None:
                raise NotFound("no such key version", what="version")
            target = self._transition(row, key, state)
            row.state, row.state_changed_at = target, self._clock.now()
            if target == DESTROYED:
                row.wrapped_key = b""  # the only copy of the material: gone for good
            self._audit.record(s, action=f"key.version_{target}", tenant_id=caller.tenant_id,
                               object=f"key:{name}:v{version}", actor=caller.actor)
            return self._view(s, key)

    @staticmethod
    def _transition(row: AppKeyVersion, key: AppKey, requested: str) -> str:
        current, latest = row.state, row.version == key.latest_version
        if current == DESTROYED:
            raise InvalidState("a destroyed version stays destroyed")
        if requested == DESTROYED:
            if latest:
                raise InvalidState("rotate the key before destroying its latest version")
            return DESTROYED
        if requested == COMPROMISED:
            return COMPROMISED
        if current == COMPROMISED:
            raise InvalidState("a compromised version can only be destroyed")
        if requested == SUSPENDED:
            return SUSPENDED
        return ACTIVE if latest else DEACTIVATED  # resume
