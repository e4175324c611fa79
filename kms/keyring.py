"""Tenant KEKs in the token, and data keys wrapped by them.

Wrapped blob format (version 1), stored as bytes:

    0x01 || IV (12 bytes, random) || AES-256-GCM ciphertext || tag (16 bytes)

encrypted inside the token under the tenant's KEK with
AAD = `kms:v1|tenant=<id>|kind=<volume|appkey>|id=<id>|version=<n>`, so that a blob
copied to another tenant, key, kind or version fails to unwrap.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from hsm import GCM_IV_BYTES, HsmDecryptFailed, HsmKeyNotFound, HsmUnavailable, Pkcs11Hsm
from kms.clock import Clock
from kms.errors import KeyIntegrityError, ServiceUnavailable
from kms.models import Kek

BLOB_VERSION = 1
_TAG_BYTES = 16


@dataclass(frozen=True)
class KeyPlace:
    """Where a wrapped key belongs; rendered into the AAD."""

    tenant_id: str
    kind: str  # "volume" | "appkey"
    object_id: str
    version: int

    def aad(self) -> bytes:
        return (f"kms:v1|tenant={self.tenant_id}|kind={self.kind}|id={self.object_id}"
                f"|version={self.version}").encode()


_TENANT_ID = re.compile(r"t-[0-9a-f]{16}")


def tenant_label_prefix(tenant_id: str) -> str:
    """`kms/<tenant>/`, for a tenant id of the form the service issues (`t-` and 16 hex
    digits) only: the id may come from a database row, and a crafted one (say
    `service/audit-anchor`) must not turn into the prefix of the service's own objects."""
    if not _TENANT_ID.fullmatch(tenant_id):
        raise KeyIntegrityError("not a tenant id")
    return f"kms/{tenant_id}/"


class Keyring:
    def __init__(self, *, hsm: Pkcs11Hsm, clock: Clock, kek_max_encryptions: int = 2**30):
        self._hsm = hsm
        self._clock = clock
        self._kek_cap = kek_max_encryptions

    def create_kek(self, session: Session, *, tenant_id: str, generation: int) -> Kek:
        """Generate a KEK generation in the token and record its CKA_ID (same transaction)."""
        label = f"{tenant_label_prefix(tenant_id)}kek/{generation}"
        try:
            cka_id = self._hsm.generate_aes_kek(label=label)
        except HsmUnavailable as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc
        kek = Kek(tenant_id=tenant_id, generation=generation, cka_id=cka_id.hex(), label=label,
                  state="active", created_at=self._clock.now())
        session.add(kek)
        session.flush()
        return kek

    @property
    def kek_cap(self) -> int:
        return self._kek_cap

    def current_kek(self, session: Session, tenant_id: str) -> Kek:
        """The KEK that wraps new keys. At its usage cap a new generation takes over; the
        old one is left `retiring` for the next KEK rotation to rewrap and destroy."""
        kek = session.scalars(
            select(Kek).where(Kek.tenant_id == tenant_id, Kek.state == "active")
            .order_by(Kek.generation.desc()).limit(1)).first()
        if kek is None:
            raise KeyIntegrityError("tenant has no active KEK")
        if kek.encryptions >= self._kek_cap:
            kek.state = "retiring"
            kek = self.create_kek(session, tenant_id=tenant_id,
                                  generation=self.next_generation(session, tenant_id))
        return kek

    @staticmethod
    def next_generation(session: Session, tenant_id: str) -> int:
        from sqlalchemy import func

        return int(session.scalar(select(func.max(Kek.generation))
                                  .where(Kek.tenant_id == tenant_id)) or 0) + 1

    def kek(self, session: Session, tenant_id: str, generation: int) -> Kek:
        kek = session.scalars(select(Kek).where(
            Kek.tenant_id == tenant_id, Kek.generation == generation)).first()
        if kek is None or kek.state == "destroyed":
            raise KeyIntegrityError("KEK generation missing or destroyed")
        return kek

    def wrap(self, kek: Kek, place: KeyPlace, key: bytes) -> bytes:
        """Wrap under `kek` (which must be attached to the caller's write transaction:
        its encryption counter moves with the new blob)."""
        kek.encryptions = Kek.encryptions + 1  # an atomic UPDATE, safe across replicas
        return self.wrap_with(kek.cka_id, place, key)

    def wrap_with(self, kek_cka_id: str, place: KeyPlace, key: bytes) -> bytes:
        """`wrap` with the KEK's CKA_ID (hex); the caller counts the use of the KEK."""
        iv = os.urandom(GCM_IV_BYTES)
        try:
            sealed = self._hsm.gcm_encrypt(bytes.fromhex(kek_cka_id), key, iv=iv,
                                           aad=place.aad())
        except HsmUnavailable as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc
        except HsmKeyNotFound as exc:
            raise KeyIntegrityError("KEK not found in the token") from exc
        return bytes([BLOB_VERSION]) + iv + sealed

    def unwrap(self, kek: Kek, place: KeyPlace, blob: bytes) -> bytes:
        """Raises KeyIntegrityError if the blob does not belong to this KEK and place."""
        return self.unwrap_with(kek.cka_id, place, blob)

    def unwrap_with(self, kek_cka_id: str, place: KeyPlace, blob: bytes) -> bytes:
        """`unwrap` with the KEK's CKA_ID (hex) as read by a Core query."""
        if len(blob) < 1 + GCM_IV_BYTES + _TAG_BYTES or blob[0] != BLOB_VERSION:
            raise KeyIntegrityError("malformed wrapped key")
        iv, sealed = blob[1:1 + GCM_IV_BYTES], blob[1 + GCM_IV_BYTES:]
        try:
            return self._hsm.gcm_decrypt(bytes.fromhex(kek_cka_id), sealed, iv=iv,
                                         aad=place.aad())
        except HsmDecryptFailed as exc:
            raise KeyIntegrityError("wrapped key does not match its place") from exc
        except HsmUnavailable as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc
        except HsmKeyNotFound as exc:
            raise KeyIntegrityError("KEK not found in the token") from exc
