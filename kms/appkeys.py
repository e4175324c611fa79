"""Application keys (like Vault Transit): encrypt, decrypt and data keys in process.

Each version's 256-bit key is wrapped by the tenant KEK in the token. Unwrapped keys
are cached as AESGCM objects keyed by the tenant's epoch, so a tenant state change
(suspension, notice, erasure) makes every cached key unusable at once.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kms import aead
from kms.audit import AuditJournal
from kms.audit_batch import AuditBatcher
from kms.caller import ROLE_APP, ROLE_TENANT_ADMIN, Caller
from kms.clock import Clock
from kms.db import Database
from kms.errors import (
    AlreadyExists,
    DecryptionFailed,
    InvalidRequest,
    KeyDisabled,
    KeyVersionUnavailable,
    NotFound,
)
from kms.keyring import KeyPlace, Keyring
from kms.models import AppKey, AppKeyVersion, Tenant
from kms.secret import SecretBytes
from kms.tenants import load_tenant, require_can_create, require_usable
from kms.validation import check_identifier

KEY_TYPES = ("aes256-gcm",)
DATAKEY_BITS = (128, 256, 512)


@dataclass(frozen=True)
class KeyView:
    name: str
    type: str
    latest_version: int
    min_decryption_version: int
    enabled: bool
    created_at: datetime

    def public(self) -> dict[str, object]:
        return {"name": self.name, "type": self.type, "latest_version": self.latest_version,
                "min_decryption_version": self.min_decryption_version,
                "enabled": self.enabled, "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class DataKey:
    plaintext: SecretBytes
    ciphertext: str


def _view(k: AppKey) -> KeyView:
    return KeyView(k.name, k.type, k.latest_version, k.min_decryption_version, k.enabled,
                   k.created_at)


class _KeyCache:
    """LRU of unwrapped version keys, keyed by (tenant, key, version, tenant epoch)."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._items: OrderedDict[tuple[str, str, int, int], AESGCM] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, k: tuple[str, str, int, int]) -> AESGCM | None:
        with self._lock:
            value = self._items.get(k)
            if value is not None:
                self._items.move_to_end(k)
            return value

    def put(self, k: tuple[str, str, int, int], value: AESGCM) -> None:
        if self._capacity == 0:
            return
        with self._lock:
            self._items[k] = value
            self._items.move_to_end(k)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def drop_tenant(self, tenant_id: str) -> None:
        with self._lock:
            for k in [k for k in self._items if k[0] == tenant_id]:
                del self._items[k]


class AppKeyService:
    def __init__(self, *, db: Database, keyring: Keyring, clock: Clock, cache_size: int,
                 audit: AuditJournal, batcher: AuditBatcher):
        self._db, self._keyring, self._clock = db, keyring, clock
        self._audit, self._batcher = audit, batcher
        self._cache = _KeyCache(cache_size)

    def drop_cached(self, tenant_id: str) -> None:
        self._cache.drop_tenant(tenant_id)

    # -- management -------------------------------------------------------------------

    def create(self, caller: Caller, *, name: str, key_type: str) -> KeyView:
        caller.require(ROLE_TENANT_ADMIN)
        check_identifier(name, field="name")
        if key_type not in KEY_TYPES:
            raise InvalidRequest(f"type must be one of {', '.join(KEY_TYPES)}", field="type")
        key = os.urandom(aead.KEY_BYTES)
        try:
            with self._db.write() as s:
                require_can_create(load_tenant(s, caller.tenant_id))
                if self._find(s, caller.tenant_id, name) is not None:
                    raise AlreadyExists("key exists", what="key")
                now = self._clock.now()
                row = AppKey(tenant_id=caller.tenant_id, name=name, type=key_type,
                             latest_version=1, min_decryption_version=1, enabled=True,
                             created_at=now)
                s.add(row)
                s.flush()
                kek = self._keyring.current_kek(s, caller.tenant_id)
                wrapped = self._keyring.wrap(kek, _place(caller.tenant_id, name, 1), key)
                s.add(AppKeyVersion(key_id=row.id, version=1, kek_generation=kek.generation,
                                    wrapped_key=wrapped, state="active", encryptions=0,
                                    created_at=now))
                self._audit.record(s, action="key.create", tenant_id=caller.tenant_id,
                                   object=f"key:{name}", actor=caller.actor)
                return _view(row)
        except IntegrityError as exc:
            raise AlreadyExists("key exists", what="key") from exc

    def list(self, caller: Caller) -> list[KeyView]:
        caller.require(ROLE_TENANT_ADMIN, ROLE_APP)
        with self._db.read() as s:
            require_usable(load_tenant(s, caller.tenant_id))
            rows = s.scalars(select(AppKey).where(AppKey.tenant_id == caller.tenant_id)
                             .order_by(AppKey.name))
            return [_view(k) for k in rows]

    def show(self, caller: Caller, name: str) -> KeyView:
        caller.require(ROLE_TENANT_ADMIN, ROLE_APP)
        check_identifier(name, field="name")
        with self._db.read() as s:
            require_usable(load_tenant(s, caller.tenant_id))
            return _view(self._get(s, caller.tenant_id, name))

    # -- data plane -------------------------------------------------------------------

    def encrypt(self, caller: Caller, name: str, plaintext: bytes, *, context: bytes = b"") -> \
            tuple[str, int]:
        """Encrypt under the latest version; returns (ciphertext string, version)."""
        caller.require(ROLE_APP)
        ciphertext, version = self._encrypt(caller, name, plaintext, context)
        self._journal_use(caller, "key.encrypt", name, version, "success")
        return ciphertext, version

    def _encrypt(self, caller: Caller, name: str, plaintext: bytes, context: bytes) -> \
            tuple[str, int]:
        check_identifier(name, field="name")
        with self._db.read() as s:
            tenant, key = self._usable_key(s, caller, name)
            version = key.latest_version
            cipher = self._version_cipher(s, tenant, key, version)
        blob = aead.seal(cipher, plaintext,
                         aad=aead.app_aad(key_name=name, version=version, context=context))
        return aead.format_ciphertext(version, blob), version

    def decrypt(self, caller: Caller, name: str, ciphertext: str, *, context: bytes = b"") \
            -> SecretBytes:
        """Raises DecryptionFailed for every authentication failure, whatever its cause."""
        caller.require(ROLE_APP)
        check_identifier(name, field="name")
        version, blob = aead.parse_ciphertext(ciphertext)
        with self._db.read() as s:
            tenant, key = self._usable_key(s, caller, name)
            if version > key.latest_version:
                raise DecryptionFailed()
            if version < key.min_decryption_version:
                raise KeyVersionUnavailable("version below min_decryption_version")
            cipher = self._version_cipher(s, tenant, key, version)
        try:
            plaintext = aead.open_sealed(
                cipher, blob, aad=aead.app_aad(key_name=name, version=version, context=context))
        except DecryptionFailed:
            self._journal_use(caller, "key.decrypt", name, version, "failure")
            raise
        self._journal_use(caller, "key.decrypt", name, version, "success")
        return SecretBytes(plaintext)

    def datakey(self, caller: Caller, name: str, *, bits: int, context: bytes = b"") -> DataKey:
        """A fresh random data key, returned in plaintext and encrypted under `name`."""
        caller.require(ROLE_APP)
        if bits not in DATAKEY_BITS:
            raise InvalidRequest("bits must be 128, 256 or 512", field="bits")
        key = os.urandom(bits // 8)
        ciphertext, version = self._encrypt(caller, name, key, context)
        self._journal_use(caller, "key.datakey", name, version, "success")
        return DataKey(SecretBytes(key), ciphertext)

    # -- helpers ----------------------------------------------------------------------

    def _journal_use(self, caller: Caller, action: str, name: str, version: int,
                     outcome: str) -> None:
        self._batcher.submit(self._audit.pending(
            action=action, tenant_id=caller.tenant_id, object=f"key:{name}:v{version}",
            outcome=outcome, actor=caller.actor))

    @staticmethod
    def _find(s: Session, tenant_id: str, name: str) -> AppKey | None:
        return s.scalars(select(AppKey).where(AppKey.tenant_id == tenant_id,
                                              AppKey.name == name)).first()

    def _get(self, s: Session, tenant_id: str, name: str) -> AppKey:
        key = self._find(s, tenant_id, name)
        if key is None:
            raise NotFound("no such key", what="key")
        return key

    def _usable_key(self, s: Session, caller: Caller, name: str) -> tuple[Tenant, AppKey]:
        tenant = load_tenant(s, caller.tenant_id)
        require_usable(tenant)
        key = self._get(s, caller.tenant_id, name)
        if not key.enabled:
            raise KeyDisabled("key is disabled")
        return tenant, key

    def _version_cipher(self, s: Session, tenant: Tenant, key: AppKey, version: int) -> AESGCM:
        cache_key = (tenant.id, key.name, version, tenant.epoch)
        cipher = self._cache.get(cache_key)
        if cipher is not None:
            return cipher
        row = s.get(AppKeyVersion, (key.id, version))
        if row is None or row.state == "destroyed":
            raise DecryptionFailed()
        kek = self._keyring.kek(s, tenant.id, row.kek_generation)
        cipher = AESGCM(self._keyring.unwrap(kek, _place(tenant.id, key.name, version),
                                             row.wrapped_key))
        self._cache.put(cache_key, cipher)
        return cipher


def _place(tenant_id: str, name: str, version: int) -> KeyPlace:
    return KeyPlace(tenant_id, "appkey", name, version)
