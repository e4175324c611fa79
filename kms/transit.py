"""The application data plane (like Vault Transit): encrypt, decrypt, rewrap, data keys,
one at a time or in batches. AES-256-GCM runs in process (`kms.aead`).

Unwrapped version keys are cached as AESGCM objects keyed by the tenant's epoch, so a
tenant state change makes every cached key unusable at once. Every encryption is counted
against its version's cap (`kms.usage`); at the cap a new version takes over.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.orm import Session

from kms import aead
from kms.appkeys import (
    ACTIVE,
    COMPROMISED,
    DEACTIVATED,
    DECRYPTABLE,
    REWRAPPABLE,
    AppKeyService,
    get_key,
    key_place,
)
from kms.audit import AuditJournal, Requirement
from kms.audit_batch import AuditBatcher
from kms.caller import ROLE_APP, Caller
from kms.db import Database
from kms.errors import (
    DecryptionFailed,
    InvalidRequest,
    KeyDisabled,
    KeyVersionUnavailable,
    KmsError,
    NotFound,
    Unauthenticated,
)
from kms.keycache import KeyCache
from kms.keyring import Keyring
from kms.models import AppKey, AppKeyVersion, Tenant
from kms.principals import LIVE_PRINCIPAL_SQL
from kms.secret import SecretBytes
from kms.tenants import load_tenant, require_can_create, require_usable, require_usable_status
from kms.usage import UsageLimiter
from kms.validation import check_identifier

DATAKEY_BITS = (128, 256, 512)
MAX_BATCH = 10_000
SYSTEM_ROTATION = "system:usage-limit"
log = logging.getLogger("kms.transit")


@dataclass(frozen=True)
class DataKey:
    plaintext: SecretBytes | None
    ciphertext: str


class ItemResult(NamedTuple):
    """One batch item: a value, or the error code and status it would have had alone.
    (A named tuple: a batch makes a thousand, and a frozen dataclass takes twice as long
    to build.)"""

    value: str | SecretBytes | None = None
    version: int | None = None
    error: KmsError | None = None


@dataclass(frozen=True)
class _Key:
    """What the data plane needs of a key (read by one Core query)."""

    tenant_id: str
    epoch: int
    key_id: int
    name: str
    latest_version: int
    min_decryption_version: int

    @classmethod
    def of(cls, tenant: Tenant, key: AppKey) -> _Key:
        return cls(tenant.id, tenant.epoch, key.id, key.name, key.latest_version,
                   key.min_decryption_version)


@dataclass(frozen=True)
class _Version:
    version: int
    state: str
    wrapped_key: bytes
    kek_generation: int

    @classmethod
    def of(cls, row: AppKeyVersion) -> _Version:
        return cls(row.version, row.state, row.wrapped_key, row.kek_generation)

    def __repr__(self) -> str:
        return f"_Version(version={self.version}, state={self.state!r})"


# The data plane's reads, in plain SQL (see Database.fetchone). CAST: PostgreSQL must
# know the type of a NULL parameter.
_LOOKUP = ("SELECT t.status, t.epoch, k.id, k.enabled, k.latest_version, "
           "k.min_decryption_version, v.version, v.state, v.wrapped_key, v.kek_generation "
           "FROM app_keys k JOIN tenants t ON t.id = k.tenant_id "
           "LEFT JOIN app_key_versions v ON v.key_id = k.id "
           "AND v.version = COALESCE(CAST(? AS INTEGER), k.latest_version) "
           "WHERE k.tenant_id = ? AND k.name = ?")
_TENANT_STATUS = "SELECT status FROM tenants WHERE id = ?"
_VERSION = ("SELECT version, state, wrapped_key, kek_generation FROM app_key_versions "
            "WHERE key_id = ? AND version = ?")
SEALABLE = (ACTIVE, DEACTIVATED)  # a rotation between the seal and its event changes nothing


@functools.lru_cache(maxsize=64)
def _still_usable_sql(versions: int, states: int) -> str:
    # From the tenant: once an erasure deleted the key, the tenant's state still answers.
    return ("SELECT t.status, k.enabled, k.min_decryption_version, "
            "(SELECT COUNT(*) FROM app_key_versions v WHERE v.key_id = k.id AND v.version "
            f"IN ({', '.join('?' * versions)}) AND v.state IN ({', '.join('?' * states)})), "
            f"{LIVE_PRINCIPAL_SQL} "
            "FROM tenants t LEFT JOIN app_keys k ON k.tenant_id = t.id AND k.id = ? "
            "WHERE t.id = ?")


def _still_usable(caller: Caller, key_id: int, versions: Sequence[int],
                  allowed: tuple[str, ...], *, min_applies: bool) -> Requirement:
    """What a success's event requires under the journal's lock: the tenant still usable,
    the caller's principal not revoked, the key still enabled, every version it used
    still in `allowed` (and, for what was decrypted, not below the minimum). A change
    that committed its own event first refuses the release, as it would have refused the
    request."""
    vs = tuple(sorted(set(versions)))
    sql = _still_usable_sql(len(vs), len(allowed))

    def check(row: tuple[object, ...] | None) -> None:
        if row is None:
            raise NotFound("no such tenant")
        status, enabled, min_decryption, usable, principal_live = row
        require_usable_status(str(status))
        if not principal_live:
            raise Unauthenticated("principal revoked")
        if enabled is None:
            raise NotFound("no such key", what="key")
        if not enabled:
            raise KeyDisabled("key is disabled")
        if min_applies and vs[0] < int(str(min_decryption)):
            raise KeyVersionUnavailable("version below min_decryption_version")
        if usable != len(vs):
            raise KeyVersionUnavailable("version no longer usable")

    return Requirement(sql, (*vs, *allowed, caller.principal_id, key_id, caller.tenant_id),
                       check)


class TransitService:
    def __init__(self, *, db: Database, keyring: Keyring, keys: AppKeyService,
                 limiter: UsageLimiter, cache_size: int, audit: AuditJournal,
                 batcher: AuditBatcher):
        self._db, self._keyring, self._keys, self._limiter = db, keyring, keys, limiter
        self._cache: KeyCache[AESGCM] = KeyCache(cache_size)
        self._audit, self._batcher = audit, batcher
        self._refill_lock = threading.Lock()
        self._refiller: ThreadPoolExecutor | None = None
        self._refiller_pid = 0

    def drop_cached(self, tenant_id: str) -> None:
        self._cache.drop(tenant_id)
        self._limiter.forget(tenant_id)

    def sweep_cache(self) -> int:
        """Drop cached keys of tenants whose state changed in another process (another
        replica, or `kms erasure run`); returns how many were dropped."""
        dropped, unusable = self._cache.sweep(self._db)
        for tenant_id in unusable:
            self._limiter.forget(tenant_id)
        return dropped

    # -- single operations ------------------------------------------------------------

    def encrypt(self, caller: Caller, name: str, plaintext: bytes, *,
                context: bytes = b"") -> tuple[str, int]:
        """Encrypt under the latest version; returns (ciphertext string, version)."""
        [result] = self.encrypt_batch(caller, name, [(plaintext, context)], batch=False)
        if result.error is not None:
            raise result.error
        assert isinstance(result.value, str) and result.version is not None
        return result.value, result.version

    def decrypt(self, caller: Caller, name: str, ciphertext: str, *,
                context: bytes = b"") -> SecretBytes:
        """Raises DecryptionFailed for every authentication failure, whatever its cause."""
        [result] = self.decrypt_batch(caller, name, [(ciphertext, context)], batch=False)
        if result.error is not None:
            raise result.error
        assert isinstance(result.value, SecretBytes)
        return result.value

    def rewrap(self, caller: Caller, name: str, ciphertext: str, *,
               context: bytes = b"") -> tuple[str, int]:
        """Re-encrypt under the latest version without the plaintext leaving the service.
        Compromised versions may be rewrapped (that is how their data is rescued)."""
        caller.require(ROLE_APP)
        check_identifier(name, field="name")
        # Every refused rewrap of an existing key is journaled, as decrypt's are.
        try:
            version, blob = aead.parse_ciphertext(ciphertext)
        except DecryptionFailed:
            self._lookup(caller, name, None)  # a missing key or unusable tenant answers so
            self._journal(caller, "key.rewrap", f"key:{name}", "failure")
            raise
        try:
            old = self._opener(caller, name, version, REWRAPPABLE)
        except (DecryptionFailed, KeyVersionUnavailable):
            self._journal(caller, "key.rewrap", f"key:{name}:v{version}", "failure")
            raise
        plaintext = self._open(old, name, version, blob, context, caller, "key.rewrap")
        [result] = self._seal_all(caller, name, [(plaintext, context)], action="key.rewrap",
                                  opened=version)
        assert isinstance(result.value, str) and result.version is not None
        return result.value, result.version

    def datakey(self, caller: Caller, name: str, *, bits: int, context: bytes = b"",
                wrapped_only: bool = False) -> DataKey:
        """A fresh random data key, encrypted under `name` (and in plaintext unless
        `wrapped_only`)."""
        caller.require(ROLE_APP)
        if bits not in DATAKEY_BITS:
            raise InvalidRequest("bits must be 128, 256 or 512", field="bits")
        key = os.urandom(bits // 8)
        [result] = self._seal_all(caller, name, [(key, context)], action="key.datakey")
        assert isinstance(result.value, str)
        return DataKey(None if wrapped_only else SecretBytes(key), result.value)

    # -- batches ------------------------------------------------------------------------

    def encrypt_batch(self, caller: Caller, name: str, items: list[tuple[bytes, bytes]], *,
                      batch: bool = True) -> list[ItemResult]:
        caller.require(ROLE_APP)
        _check_batch(items)
        return self._seal_all(caller, name, items, action="key.encrypt", batch=batch)

    def decrypt_batch(self, caller: Caller, name: str, items: list[tuple[str, bytes]], *,
                      batch: bool = True) -> list[ItemResult]:
        """Per item: the plaintext, or the error it would get alone."""
        caller.require(ROLE_APP)
        check_identifier(name, field="name")
        _check_batch(items)
        ciphers: dict[int, AESGCM | KmsError] = {}
        results, failures = [], 0
        parsed: list[tuple[int, bytes] | None] = []
        for ciphertext, _context in items:
            try:
                parsed.append(aead.parse_ciphertext(ciphertext))
            except DecryptionFailed:
                parsed.append(None)
        first_version = next((p[0] for p in parsed if p is not None), None)
        # One look at the tenant, the key and the first version for the whole batch.
        key, first = self._lookup(caller, name, first_version)
        for p in parsed:
            if p is None or p[0] in ciphers:
                continue
            version = p[0]
            try:
                row = None
                if key.min_decryption_version <= version <= key.latest_version:
                    row = first if first is not None and first.version == version \
                        else self._version(key, version)
                ciphers[version] = self._opener_in(key, version, row, DECRYPTABLE)
            except (DecryptionFailed, KeyVersionUnavailable) as exc:
                ciphers[version] = exc
        for p, (_ciphertext, context) in zip(parsed, items, strict=True):
            try:
                if p is None:
                    raise DecryptionFailed()
                version, blob = p
                cipher = ciphers[version]
                if isinstance(cipher, KmsError):
                    raise cipher
                plaintext = aead.open_sealed(cipher, blob, aad=aead.app_aad(
                    key_name=name, version=version, context=context))
                results.append(ItemResult(SecretBytes(plaintext), version))
            except (DecryptionFailed, KeyVersionUnavailable) as exc:
                failures += 1
                results.append(ItemResult(error=exc))
        if not batch and failures:
            self._journal(caller, "key.decrypt", f"key:{name}", "failure")
            return results
        opened = [r.version for r in results if r.error is None and r.version is not None]
        self._journal(caller, "key.decrypt", f"key:{name}" + _count(len(items), batch),
                      "success" if not failures else f"partial:{failures}",
                      requires=_still_usable(caller, key.key_id, opened, DECRYPTABLE,
                                             min_applies=True) if opened else None)
        return results

    # -- internals ----------------------------------------------------------------------

    def _seal_all(self, caller: Caller, name: str, items: list[tuple[bytes, bytes]], *,
                  action: str, batch: bool = False, opened: int | None = None
                  ) -> list[ItemResult]:
        """Seal under the latest version; `opened`: the version a rewrap decrypted."""
        check_identifier(name, field="name")
        key_id, version, cipher = self._reserve(caller, name, len(items))
        prefix = aead.app_aad_prefix(key_name=name, version=version)
        out = [ItemResult(text, version)
               for text in aead.seal_formatted(cipher, version, prefix, items)]
        requires = _still_usable(caller, key_id, [version], SEALABLE, min_applies=False) \
            if opened is None else _still_usable(caller, key_id, [opened, version],
                                                 REWRAPPABLE, min_applies=True)
        self._journal(caller, action, f"key:{name}:v{version}" + _count(len(items), batch),
                      "success", requires=requires)
        return out

    def _reserve(self, caller: Caller, name: str, n: int) -> tuple[int, int, AESGCM]:
        """The latest usable version with `n` encryptions reserved under it; rotates the
        key when its latest version has reached the cap."""
        found, latest = self._lookup(caller, name, None)
        if latest is None or latest.state != "active":
            raise KeyVersionUnavailable("the latest version may not encrypt: rotate")
        if self._limiter.try_take_local(found.tenant_id, found.key_id, latest.version, n):
            if self._limiter.wants_refill(found.tenant_id, found.key_id, latest.version):
                self._refill_in_background(found, latest.version)
            return found.key_id, latest.version, self._cipher(found, latest)
        with self._db.write() as s:
            tenant, key = self._usable(s, caller, name)
            # The row lock serializes replicas reserving under the same version.
            row = s.get(AppKeyVersion, (key.id, key.latest_version), with_for_update=True)
            assert row is not None
            if row.state != "active":
                raise KeyVersionUnavailable("the latest version may not encrypt: rotate")
            if not self._limiter.reserve(s, tenant_id=tenant.id, key_name=name, row=row, n=n):
                require_can_create(tenant)  # no new version under notice, even at the cap
                row = self._keys.add_version(s, tenant.id, key)
                self._audit.record(s, action="key.rotate", tenant_id=tenant.id,
                                   object=f"key:{name}:v{row.version}:usage-cap",
                                   actor=SYSTEM_ROTATION)
                if not self._limiter.reserve(s, tenant_id=tenant.id, key_name=name, row=row,
                                             n=n):
                    raise InvalidRequest("batch larger than a key version may encrypt",
                                         field="batch")
            return key.id, row.version, self._cipher(_Key.of(tenant, key), _Version.of(row), s)

    def _refill_in_background(self, key: _Key, version: int) -> None:
        """Reserve the next block of counts off the request path (one worker thread)."""
        with self._refill_lock:
            if self._refiller is None or self._refiller_pid != os.getpid():
                self._refiller = ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="usage-refill")
                self._refiller_pid = os.getpid()
            self._refiller.submit(self._refill, key, version)

    def _refill(self, key: _Key, version: int) -> None:
        try:
            with self._db.write() as s:
                # As in the foreground path: the tenant's state is read in the write
                # transaction, so no counter is created for a tenant being erased.
                tenant = load_tenant(s, key.tenant_id)
                require_usable(tenant)
                row = s.get(AppKeyVersion, (key.key_id, version), with_for_update=True)
                if row is not None and row.state == "active":
                    self._limiter.reserve(s, tenant_id=key.tenant_id, key_name=key.name,
                                          row=row, n=0, spare=True)
        except Exception as exc:  # noqa: BLE001 - the foreground path reserves instead
            log.warning("usage refill failed: %s", type(exc).__name__)
        finally:
            self._limiter.refill_done(key.tenant_id, key.key_id, version)

    def _opener(self, caller: Caller, name: str, version: int,
                allowed: tuple[str, ...]) -> AESGCM:
        key, row = self._lookup(caller, name, version)
        return self._opener_in(key, version, row, allowed)

    def _opener_in(self, key: _Key, version: int, row: _Version | None,
                   allowed: tuple[str, ...]) -> AESGCM:
        if version > key.latest_version:  # no such version
            raise DecryptionFailed()
        if version < key.min_decryption_version:
            raise KeyVersionUnavailable("version below min_decryption_version")
        if row is None:
            raise DecryptionFailed()
        if row.state not in allowed:
            raise KeyVersionUnavailable(f"version is {row.state}")
        return self._cipher(key, row)

    def _open(self, cipher: AESGCM, name: str, version: int, blob: bytes, context: bytes,
              caller: Caller, action: str) -> bytes:
        try:
            return aead.open_sealed(cipher, blob, aad=aead.app_aad(
                key_name=name, version=version, context=context))
        except DecryptionFailed:
            self._journal(caller, action, f"key:{name}:v{version}", "failure")
            raise

    def _usable(self, s: Session, caller: Caller, name: str) -> tuple[Tenant, AppKey]:
        tenant = load_tenant(s, caller.tenant_id)
        require_usable(tenant)
        key = get_key(s, caller.tenant_id, name)
        if not key.enabled:
            raise KeyDisabled("key is disabled")
        return tenant, key

    def _lookup(self, caller: Caller, name: str,
                version: int | None) -> tuple[_Key, _Version | None]:
        """The hot path's one query: tenant state, the key, and one version of it (the
        latest when `version` is None). Raises as `_usable` does."""
        db = self._db
        row = db.fetchone(db.sql(_LOOKUP), (version, caller.tenant_id, name))
        if row is None:
            tenant = db.fetchone(db.sql(_TENANT_STATUS), (caller.tenant_id,))
            if tenant is None:
                raise NotFound("no such tenant")
            require_usable_status(tenant[0])
            raise NotFound("no such key", what="key")
        (status, epoch, key_id, enabled, latest, min_decryption, found, state, wrapped,
         kek_generation) = row
        require_usable_status(status)
        if not enabled:
            raise KeyDisabled("key is disabled")
        key = _Key(caller.tenant_id, epoch, key_id, name, latest, min_decryption)
        if found is None:
            return key, None
        return key, _Version(found, state, bytes(wrapped), kek_generation)

    def _version(self, key: _Key, version: int) -> _Version | None:
        row = self._db.fetchone(self._db.sql(_VERSION), (key.key_id, version))
        return None if row is None else _Version(row[0], row[1], bytes(row[2]), row[3])

    def _cipher(self, key: _Key, row: _Version, s: Session | None = None) -> AESGCM:
        """The version's key (cached unless compromised); unwrapped in the token on a miss."""
        cache_key = (key.tenant_id, key.name, row.version, key.epoch)
        cipher = self._cache.get(cache_key)
        if cipher is not None and row.state != COMPROMISED:
            return cipher
        if not row.wrapped_key:
            raise DecryptionFailed()
        place = key_place(key.tenant_id, key.name, row.version)
        if s is not None:
            kek = self._keyring.kek(s, key.tenant_id, row.kek_generation)
        else:
            with self._db.read() as rs:
                kek = self._keyring.kek(rs, key.tenant_id, row.kek_generation)
        cipher = AESGCM(self._keyring.unwrap(kek, place, row.wrapped_key))
        if row.state != COMPROMISED:
            self._cache.put(cache_key, cipher)
        return cipher

    def _journal(self, caller: Caller, action: str, obj: str, outcome: str, *,
                 requires: Requirement | None = None) -> None:
        self._batcher.submit(self._audit.pending(action=action, tenant_id=caller.tenant_id,
                                                 object=obj, outcome=outcome,
                                                 actor=caller.actor, requires=requires))


def _check_batch(items: Sequence[object]) -> None:
    if not items or len(items) > MAX_BATCH:
        raise InvalidRequest(f"a batch holds 1 to {MAX_BATCH} items", field="batch")


def _count(n: int, batch: bool) -> str:
    return f":batch={n}" if batch else ""
