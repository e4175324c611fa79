"""The PKCS#11 adapter: one logged-in session per process, every call serialized.

Facts that shape this module (SoftHSM 2.6.1, python-pkcs11 0.10, see DESIGN.md):
concurrent calls into the token crash the process, so every call holds one
process-wide lock; AES-GCM exists only through C_Encrypt/C_Decrypt with a caller-made
IV; CKM_ECDSA signs a digest we compute ourselves.

Keys are found by their random CKA_ID, never by label. Handles live only as long as the
session that produced them: a re-initialisation drops every cached handle.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from hsm import inline
from hsm.errors import (
    HsmAmbiguousKey,
    HsmDecryptFailed,
    HsmDestroyUnconfirmed,
    HsmError,
    HsmKeyNotFound,
    HsmKeyUsageRefused,
    HsmLoginFailed,
    HsmMechanismMissing,
    HsmUnavailable,
)

T = TypeVar("T")

GCM_IV_BYTES = 12
GCM_TAG_BITS = 128
CKA_ID_BYTES = 16

# Errors after which the session (or the whole library) is re-initialised.
_SESSION_LOST: tuple[type[Exception], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.DeviceMemory,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
)

# A key used for what it was not made for: refused by the token or by the binding, which
# gives no encrypt() to a MAC key and no sign() to a KEK.
_MISUSE: tuple[type[Exception], ...] = (
    AttributeError, p11e.KeyTypeInconsistent, p11e.MechanismInvalid,
)

_REQUIRED_MECHANISMS = (
    Mechanism.AES_KEY_GEN,
    Mechanism.AES_GCM,
    Mechanism.GENERIC_SECRET_KEY_GEN,
    Mechanism.SHA256_HMAC,
    Mechanism.EC_KEY_PAIR_GEN,
    Mechanism.ECDSA,
)


@dataclass(frozen=True)
class TokenInfo:
    manufacturer: str
    model: str
    serial: str
    label: str


@dataclass(frozen=True)
class TokenObject:
    cka_id: bytes
    label: str
    object_class: str


class _LibState:
    """The loaded module, shared by every adapter of this process, re-made after fork.

    `lock` serializes every call into the module, whichever adapter makes it: a module
    finalized and re-initialized by one adapter while another is inside a call crashes
    the process (SoftHSM frees the objects under it)."""

    lock = threading.RLock()
    libs: dict[str, tuple[Any, int, int]] = {}  # path -> (lib, pid, generation)

    @classmethod
    def get(cls, path: str) -> tuple[Any, int]:
        with cls.lock:
            entry = cls.libs.get(path)
            if entry is None:
                lib = pkcs11.lib(path)
                cls.libs[path] = (lib, os.getpid(), 1)
                return lib, 1
            lib, pid, gen = entry
            if pid != os.getpid():
                _reinitialize(lib)
                cls.libs[path] = (lib, os.getpid(), gen + 1)
                return lib, gen + 1
            return lib, gen

    @classmethod
    def generation(cls, path: str) -> int:
        with cls.lock:
            entry = cls.libs.get(path)
            return entry[2] if entry is not None else 0

    @classmethod
    def reset(cls, path: str, seen_generation: int) -> None:
        """Finalize and re-initialize the module, unless another adapter already did."""
        with cls.lock:
            entry = cls.libs.get(path)
            if entry is None or entry[2] != seen_generation:
                return
            lib, _pid, gen = entry
            _reinitialize(lib)
            cls.libs[path] = (lib, os.getpid(), gen + 1)


def _new_lock_in_child() -> None:
    # A thread of the parent may have held the lock at fork time: the child starts free.
    _LibState.lock = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _reinitialize(lib: Any) -> None:
    try:
        lib.reinitialize()
    except p11e.PKCS11Error:
        lib.initialize()


class Pkcs11Hsm:
    """A PKCS#11 token reached through one serialized, logged-in session.

    Every public method may raise `HsmUnavailable` (after one transparent re-initialise
    and retry for idempotent calls) and never returns or logs key material.
    """

    def __init__(self, *, module_path: str, token_label: str, pin_reader: Callable[[], str]):
        self._module_path = module_path
        self._token_label = token_label
        self._pin_reader = pin_reader
        self._session: Any = None
        self._token: Any = None
        self._pid: int | None = None
        self._generation = 0
        self._handles: dict[tuple[bytes, int], Any] = {}
        self._counters: dict[str, tuple[Any, int]] = {}  # label -> (object, value)
        self._ever_opened = False

    def __repr__(self) -> str:
        return f"Pkcs11Hsm(module={self._module_path!r}, token={self._token_label!r})"

    @property
    def _lock(self) -> threading.RLock:
        return _LibState.lock  # process-wide: see _LibState

    # -- session management -------------------------------------------------------

    def _open(self) -> None:
        lib, gen = _LibState.get(self._module_path)
        try:
            token = lib.get_token(token_label=self._token_label)
        except (p11e.NoSuchToken, p11e.MultipleTokensReturned) as exc:
            raise HsmLoginFailed(f"token {self._token_label!r} not found or not unique") from exc
        try:
            session = token.open(rw=True, user_pin=self._pin_reader().strip())
        except (p11e.PinIncorrect, p11e.PinLenRange, p11e.PinInvalid, p11e.PinLocked) as exc:
            raise HsmLoginFailed("the token refused the user PIN") from exc
        except p11e.UserAlreadyLoggedIn:
            # Another adapter of this process already logged the token in.
            session = token.open(rw=True)
        self._token, self._session, self._generation = token, session, gen
        self._pid = os.getpid()
        self._ever_opened = True
        self._forget_objects()

    def _ensure_open(self) -> None:
        if self._session is not None and _LibState.generation(self._module_path) \
                != self._generation:
            # The module was re-initialised (by another adapter of this process): every
            # session and handle of the old generation is gone.
            self._session = None
            self._forget_objects()
        if self._session is None or self._pid != os.getpid():
            if self._pid is not None and self._pid != os.getpid():
                self._session = None  # inherited from the parent: never touch it
            self._open()

    def _forget_objects(self) -> None:
        self._handles.clear()
        self._counters.clear()

    def _reset(self) -> None:
        self._forget_objects()
        self._session = None
        _LibState.reset(self._module_path, self._generation)

    def _run(self, fn: Callable[[Any], T], *, retry: bool = True) -> T:
        if inline.active():
            # On an event loop: never wait for the lock, never open a session there.
            if not self._lock.acquire(blocking=False):
                raise inline.WouldBlock()
            try:
                if self._session is None or self._pid != os.getpid() or \
                        _LibState.generation(self._module_path) != self._generation:
                    raise inline.WouldBlock()
                try:
                    return self._run_locked(fn, retry=False)
                except HsmUnavailable as exc:
                    # The session was lost and reset: re-open and retry off the loop.
                    raise inline.WouldBlock() from exc
            finally:
                self._lock.release()
        with self._lock:
            return self._run_locked(fn, retry=retry)

    def _run_locked(self, fn: Callable[[Any], T], *, retry: bool) -> T:
        for attempt in (1, 2):
            try:
                self._ensure_open()
                return fn(self._session)
            except HsmLoginFailed as exc:
                if self._ever_opened:  # it worked before: the token is away for now
                    raise HsmUnavailable("the security token is unavailable") from exc
                raise
            except HsmError:
                raise
            except _MISUSE as exc:
                raise HsmKeyUsageRefused("the token refused this use of the key") from exc
            except _SESSION_LOST as exc:
                self._reset()
                if attempt == 2 or not retry:
                    raise HsmUnavailable("the security token is unavailable") from exc
            except p11e.PKCS11Error as exc:
                # Anything else the binding raises (CKR_CRYPTOKI_NOT_INITIALIZED after a
                # finalize, a missing token, ...): re-initialise and, for idempotent
                # calls, try once more; then it is a token we cannot use right now.
                self._reset()
                if attempt == 2 or not retry:
                    raise HsmUnavailable(
                        f"the security token failed: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._session is not None and self._pid == os.getpid():
                try:
                    self._session.close()
                except p11e.PKCS11Error:
                    pass
            self._session = None
            self._forget_objects()

    # -- lookups ------------------------------------------------------------------

    def _find_one(self, session: Any, cka_id: bytes, object_class: ObjectClass) -> Any:
        cached = self._handles.get((cka_id, int(object_class)))
        if cached is not None:
            return cached
        found = list(session.get_objects({Attribute.ID: cka_id, Attribute.CLASS: object_class}))
        if not found:
            raise HsmKeyNotFound(f"no {object_class.name} with CKA_ID {cka_id.hex()}")
        if len(found) > 1:
            raise HsmAmbiguousKey(f"{len(found)} objects share CKA_ID {cka_id.hex()}")
        self._handles[(cka_id, int(object_class))] = found[0]
        return found[0]

    def token_info(self) -> TokenInfo:
        def op(_s: Any) -> TokenInfo:
            t = self._token
            serial = t.serial.decode() if isinstance(t.serial, bytes) else str(t.serial)
            return TokenInfo(t.manufacturer_id.strip(), t.model.strip(), serial.strip(),
                             t.label.strip())

        return self._run(op)

    def find_objects(self, *, cka_id: bytes | None = None,
                     label_prefix: str | None = None) -> list[TokenObject]:
        """A fresh search of the token: objects with this CKA_ID and/or label prefix."""
        if cka_id is None and label_prefix is None:
            raise ValueError("give cka_id, label_prefix or both")

        def op(session: Any) -> list[TokenObject]:
            attrs = {Attribute.ID: cka_id} if cka_id is not None else {}
            out = []
            for obj in list(session.get_objects(attrs)):
                label = obj[Attribute.LABEL] or ""
                if label_prefix is not None and not label.startswith(label_prefix):
                    continue
                out.append(_describe(obj, label))
            return out

        return self._run(op)

    def key_attributes(self, cka_id: bytes) -> dict[str, bool]:
        """Boolean attributes of a secret key, read back from the token (for audits)."""
        names = ("TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE",
                 "NEVER_EXTRACTABLE", "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "SIGN",
                 "VERIFY", "DERIVE")

        def op(session: Any) -> dict[str, bool]:
            key = self._find_one(session, cka_id, ObjectClass.SECRET_KEY)
            return {n: bool(key[getattr(Attribute, n)]) for n in names}

        return self._run(op)

    # -- key generation (never retried: a retry could create a second object) -------

    def generate_aes_kek(self, *, label: str) -> bytes:
        """Create an AES-256 KEK: sensitive, non-extractable, encrypt/decrypt only."""
        cka_id = os.urandom(CKA_ID_BYTES)
        template = _secret_template(encrypt=True)

        def op(session: Any) -> bytes:
            session.generate_key(KeyType.AES, 256, id=cka_id, label=label, store=True,
                                 mechanism=Mechanism.AES_KEY_GEN, template=template)
            return cka_id

        return self._run(op, retry=False)

    def generate_hmac_key(self, *, label: str) -> bytes:
        """Create a 256-bit generic secret for CKM_SHA256_HMAC (sign/verify only)."""
        cka_id = os.urandom(CKA_ID_BYTES)
        template = _secret_template(sign=True)

        def op(session: Any) -> bytes:
            session.generate_key(KeyType.GENERIC_SECRET, 256, id=cka_id, label=label, store=True,
                                 mechanism=Mechanism.GENERIC_SECRET_KEY_GEN, template=template)
            return cka_id

        return self._run(op, retry=False)

    def generate_signing_key(self, *, label: str) -> bytes:
        """Create an ECDSA P-256 key pair; the private half is sensitive, non-extractable."""
        cka_id = os.urandom(CKA_ID_BYTES)

        def op(session: Any) -> bytes:
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True)
            params.generate_keypair(
                id=cka_id, label=label, store=True, mechanism=Mechanism.EC_KEY_PAIR_GEN,
                public_template={Attribute.VERIFY: True, Attribute.ENCRYPT: False,
                                 Attribute.WRAP: False, Attribute.DERIVE: False},
                private_template={Attribute.SIGN: True, Attribute.SENSITIVE: True,
                                  Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
                                  Attribute.DECRYPT: False, Attribute.UNWRAP: False,
                                  Attribute.DERIVE: False})
            return cka_id

        return self._run(op, retry=False)

    # -- cryptographic operations ---------------------------------------------------

    def gcm_encrypt(self, cka_id: bytes, plaintext: bytes, *, iv: bytes, aad: bytes) -> bytes:
        """AES-256-GCM inside the token; returns ciphertext || 16-byte tag."""
        _check_iv(iv)

        def op(session: Any) -> bytes:
            key = self._find_one(session, cka_id, ObjectClass.SECRET_KEY)
            return bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                     mechanism_param=GCMParams(iv, aad, GCM_TAG_BITS)))

        return self._run(op)

    def gcm_decrypt(self, cka_id: bytes, ciphertext: bytes, *, iv: bytes, aad: bytes) -> bytes:
        """AES-256-GCM inside the token. Raises HsmDecryptFailed on any tag mismatch."""
        _check_iv(iv)
        if len(ciphertext) < GCM_TAG_BITS // 8:
            raise HsmDecryptFailed("ciphertext shorter than the tag")

        def op(session: Any) -> bytes:
            key = self._find_one(session, cka_id, ObjectClass.SECRET_KEY)
            try:
                return bytes(key.decrypt(ciphertext, mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(iv, aad, GCM_TAG_BITS)))
            except (p11e.GeneralError, p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange,
                    p11e.FunctionFailed) as exc:
                # SoftHSM reports a bad GCM tag as CKR_GENERAL_ERROR.
                raise HsmDecryptFailed("AES-GCM authentication failed") from exc

        try:
            return self._run(op)
        except HsmDecryptFailed:
            # Every blob the token unwraps was wrapped by it, so a failure is either a
            # damaged blob or a stale view of the key: SoftHSM's file store may hold a
            # copy of an object another process (`kms tenant rotate-kek`) was still
            # writing when this one read it, and keeps using it (a break-it trial saw
            # every unwrap under a freshly rotated KEK fail until the next rotation).
            # Read the token again (re-initialise, log in, find the key by CKA_ID) and
            # try once more, off the event loop; then the blob is what is wrong.
            if inline.active():
                raise inline.WouldBlock() from None
            with self._lock:
                self._reset()
            return self._run(op)

    def hmac_sha256(self, cka_id: bytes, data: bytes) -> bytes:
        def op(session: Any) -> bytes:
            key = self._find_one(session, cka_id, ObjectClass.SECRET_KEY)
            return bytes(key.sign(data, mechanism=Mechanism.SHA256_HMAC))

        return self._run(op)

    def sign_p256(self, cka_id: bytes, data: bytes) -> bytes:
        """ECDSA P-256 over SHA-256(data); returns a DER signature that OpenSSL verifies."""
        digest = hashlib.sha256(data).digest()

        def op(session: Any) -> bytes:
            key = self._find_one(session, cka_id, ObjectClass.PRIVATE_KEY)
            return bytes(encode_ecdsa_signature(key.sign(digest, mechanism=Mechanism.ECDSA)))

        return self._run(op)

    def public_key_der(self, cka_id: bytes) -> bytes:
        """SubjectPublicKeyInfo (DER) of a P-256 key pair."""
        def op(session: Any) -> bytes:
            return bytes(encode_ec_public_key(
                self._find_one(session, cka_id, ObjectClass.PUBLIC_KEY)))

        return self._run(op)

    # -- destruction ----------------------------------------------------------------

    def destroy(self, cka_id: bytes, *, within: str | None = None,
                label: str | None = None) -> None:
        """Destroy every object with this CKA_ID, then confirm by a fresh search.

        Raises HsmDestroyUnconfirmed if the token refuses or anything remains. Destroying
        an id that is already absent succeeds (idempotent). With `within`, every object
        with the id must have a label under that prefix, or nothing is destroyed: a
        CKA_ID read from a database that was tampered with must not reach another
        tenant's key or a service key. With `label`, every such object must carry exactly
        that label (token labels cannot be modified)."""
        def op(session: Any) -> None:
            objs = list(session.get_objects({Attribute.ID: cka_id}))
            for obj in objs:
                found = obj[Attribute.LABEL] or ""
                if (within is not None and not found.startswith(within)) or \
                        (label is not None and found != label):
                    raise HsmDestroyUnconfirmed("refusing to destroy an object that is not "
                                                "the expected one")
            for obj in objs:
                try:
                    obj.destroy()
                except (p11e.FunctionRejected, p11e.GeneralError, p11e.FunctionFailed,
                        p11e.DeviceMemory, p11e.TokenWriteProtected,
                        p11e.AttributeReadOnly) as exc:
                    raise HsmDestroyUnconfirmed(
                        f"the token refused to destroy {cka_id.hex()}") from exc
            self._handles = {k: v for k, v in self._handles.items() if k[0] != cka_id}

        self._run(op)
        self._confirm_absent(cka_id=cka_id)

    def destroy_by_label_prefix(self, label_prefix: str) -> list[TokenObject]:
        """Destroy every object whose label starts with the prefix (orphan keys, counters),
        then confirm by a fresh search. Returns what was destroyed."""
        if not label_prefix:
            raise ValueError("refusing to destroy by an empty label prefix")

        def op(session: Any) -> list[TokenObject]:
            gone = []
            for obj in list(session.get_objects()):
                label = obj[Attribute.LABEL] or ""
                if label.startswith(label_prefix):
                    described = _describe(obj, label)
                    try:
                        obj.destroy()
                    except (p11e.FunctionRejected, p11e.GeneralError, p11e.FunctionFailed,
                            p11e.DeviceMemory, p11e.TokenWriteProtected) as exc:
                        raise HsmDestroyUnconfirmed("the token refused to destroy an "
                                                    "object") from exc
                    gone.append(described)
            self._forget_objects()
            return gone

        destroyed = self._run(op)
        self._confirm_absent(label_prefix=label_prefix)
        return destroyed

    def destroy_objects(self, label_prefix: str, cka_ids: Iterable[bytes] = ()
                        ) -> list[TokenObject]:
        """One pass over the token: destroy every object whose label starts with the
        prefix or whose CKA_ID is listed; return them. Not a confirmation: follow with
        `find_remaining` (a fresh search)."""
        _check_prefix(label_prefix)
        ids = set(cka_ids)

        def op(session: Any) -> list[TokenObject]:
            gone = []
            try:
                for obj, described in _matching(session, label_prefix, ids):
                    try:
                        obj.destroy()
                    except (p11e.FunctionRejected, p11e.GeneralError, p11e.FunctionFailed,
                            p11e.DeviceMemory, p11e.TokenWriteProtected,
                            p11e.AttributeReadOnly) as exc:
                        raise HsmDestroyUnconfirmed("the token refused to destroy an "
                                                    "object") from exc
                    gone.append(described)
            finally:
                self._forget_objects()
            return gone

        return self._run(op)

    def find_remaining(self, label_prefix: str, cka_ids: Iterable[bytes] = ()
                       ) -> list[TokenObject]:
        """A fresh search, in a new session (nothing cached answers for the token): the
        objects whose label starts with the prefix or whose CKA_ID is listed."""
        _check_prefix(label_prefix)
        ids = set(cka_ids)
        with self._lock:
            self.close()
            return self._run(lambda session: [d for _o, d in
                                              _matching(session, label_prefix, ids)])

    # -- monotonic counters (usage limits that a database restore cannot roll back) -----

    # A search costs time in proportion to the objects in the token (SoftHSM: ~11 us an
    # object, 0.2 s in a token of 20,000), so the object this adapter last wrote under a
    # label is remembered for its session: raising it again is a create and a destroy,
    # no search. Other writers only ever raise a counter (readers take the maximum), so
    # the remembered value is never above the token's; an erasure clears the memory.

    def read_counter(self, label: str) -> int:
        """The highest value stored under this label (0 when none)."""
        def op(session: Any) -> int:
            known = self._counters.get(label)
            if known is not None:
                return known[1]
            objs = session.get_objects({Attribute.CLASS: ObjectClass.DATA,
                                        Attribute.LABEL: label,
                                        Attribute.APPLICATION: _COUNTER_APP})
            return max((int.from_bytes(bytes(o[Attribute.VALUE]), "big") for o in list(objs)),
                       default=0)

        return self._run(op)

    def raise_counter(self, label: str, value: int) -> None:
        """Store `value` under `label` unless a higher value is already there. The new
        object is written before older ones are removed, so a crash never lowers it."""
        def op(session: Any) -> None:
            query = {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label,
                     Attribute.APPLICATION: _COUNTER_APP}
            known = self._counters.get(label)
            if known is not None:
                if known[1] >= value:
                    return
                old = [known[0]]
            else:
                old = list(session.get_objects(query))
                values = [int.from_bytes(bytes(o[Attribute.VALUE]), "big") for o in old]
                if values and max(values) >= value:
                    return
            new = session.create_object({**query, Attribute.TOKEN: True,
                                         Attribute.PRIVATE: True, Attribute.MODIFIABLE: False,
                                         Attribute.VALUE: value.to_bytes(
                                             max(8, (value.bit_length() + 7) // 8), "big")})
            self._counters[label] = (new, value)
            for o in old:
                try:
                    o.destroy()
                except p11e.ObjectHandleInvalid:
                    pass  # another writer already removed it

        self._run(op, retry=False)

    def _confirm_absent(self, *, cka_id: bytes | None = None,
                        label_prefix: str | None = None) -> None:
        with self._lock:
            # A fresh session, so nothing cached can answer for the token.
            self.close()
            remaining = self.find_objects(cka_id=cka_id, label_prefix=label_prefix)
        if remaining:
            raise HsmDestroyUnconfirmed(f"{len(remaining)} object(s) still present after destroy")

    # -- start-up self-test ---------------------------------------------------------

    def self_test(self) -> None:
        """Check every mechanism the service needs, with session objects that vanish
        with the session. Raises HsmMechanismMissing; never falls back silently."""
        def op(session: Any) -> None:
            available = set(self._token.slot.get_mechanisms())
            missing = [m.name for m in _REQUIRED_MECHANISMS if m not in available]
            if missing:
                raise HsmMechanismMissing(f"token lacks mechanisms: {', '.join(missing)}")
            try:
                _exercise_mechanisms(session)
            except HsmError:
                raise
            except p11e.PKCS11Error as exc:
                raise HsmMechanismMissing(f"self-test failed: {type(exc).__name__}") from exc

        self._run(op)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the adapter lock across several calls (fault-injection tests use it)."""
        with self._lock:
            yield


_COUNTER_APP = "kms-counter"


def _matching(session: Any, label_prefix: str, ids: set[bytes]
              ) -> list[tuple[Any, TokenObject]]:
    """Every object of the token, label and CKA_ID read in one call each; those under
    the prefix or with a listed CKA_ID. A listed CKA_ID on an object outside the prefix
    raises HsmDestroyUnconfirmed: the ids come from the database, and one that names
    another tenant's key or a service key means the database was tampered with."""
    out = []
    for obj in list(session.get_objects()):
        try:
            attrs = obj.get_attributes([Attribute.LABEL, Attribute.ID])
        except p11e.PKCS11Error:
            attrs = {Attribute.LABEL: obj[Attribute.LABEL]}
        label = attrs.get(Attribute.LABEL) or ""
        cka_id = bytes(attrs.get(Attribute.ID) or b"")
        if cka_id and cka_id in ids and not label.startswith(label_prefix):
            raise HsmDestroyUnconfirmed("a recorded CKA_ID names an object outside the "
                                        "label prefix")
        if label.startswith(label_prefix):
            out.append((obj, TokenObject(cka_id, label, ObjectClass(obj[Attribute.CLASS]).name)))
    return out


_SERVICE_PREFIX = "kms/service/"


def _check_prefix(label_prefix: str) -> None:
    """A prefix that bulk destruction may use: not empty, ends with "/", and not the
    service's own objects (audit key, its anchor, signing key)."""
    if not label_prefix or not label_prefix.endswith("/") \
            or _SERVICE_PREFIX.startswith(label_prefix) or label_prefix.startswith(_SERVICE_PREFIX):
        raise ValueError("refusing to destroy by this label prefix")


def _describe(obj: Any, label: str) -> TokenObject:
    try:
        cka_id = bytes(obj[Attribute.ID] or b"")
    except p11e.PKCS11Error:  # data objects have no CKA_ID
        cka_id = b""
    return TokenObject(cka_id, label, ObjectClass(obj[Attribute.CLASS]).name)


def _secret_template(*, encrypt: bool = False, sign: bool = False) -> dict[Attribute, bool]:
    return {
        Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False, Attribute.MODIFIABLE: False,
        Attribute.ENCRYPT: encrypt, Attribute.DECRYPT: encrypt,
        Attribute.SIGN: sign, Attribute.VERIFY: sign,
        Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.DERIVE: False,
    }


def _check_iv(iv: bytes) -> None:
    if len(iv) != GCM_IV_BYTES:
        raise ValueError("AES-GCM IV must be 96 bits")


def _exercise_mechanisms(session: Any) -> None:
    aes = session.generate_key(KeyType.AES, 256, store=False, mechanism=Mechanism.AES_KEY_GEN,
                               template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
    iv = os.urandom(GCM_IV_BYTES)
    params = GCMParams(iv, b"self-test", GCM_TAG_BITS)
    ct = aes.encrypt(b"self-test", mechanism=Mechanism.AES_GCM, mechanism_param=params)
    if aes.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=params) != b"self-test":
        raise HsmMechanismMissing("AES-GCM round trip failed")
    mac = session.generate_key(KeyType.GENERIC_SECRET, 256, store=False,
                               mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                               template={Attribute.SIGN: True, Attribute.VERIFY: True})
    if len(mac.sign(b"self-test", mechanism=Mechanism.SHA256_HMAC)) != 32:
        raise HsmMechanismMissing("HMAC-SHA256 output has the wrong length")
    ecp = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
    pub, priv = ecp.generate_keypair(store=False, mechanism=Mechanism.EC_KEY_PAIR_GEN)
    digest = hashlib.sha256(b"self-test").digest()
    sig = priv.sign(digest, mechanism=Mechanism.ECDSA)
    if not pub.verify(digest, sig, mechanism=Mechanism.ECDSA):
        raise HsmMechanismMissing("ECDSA P-256 signature did not verify")
    for obj in (aes, mac, pub, priv):
        obj.destroy()
