"""Service secrets that must be stored reversibly (an operator's TOTP seed) are sealed
with AES-256-GCM inside the token under the service's `secrets-kek`, with an AAD naming
their owner and purpose. Same blob format as `kms.keyring`."""

from __future__ import annotations

import os

from sqlalchemy.orm import Session

from hsm import GCM_IV_BYTES, HsmDecryptFailed, HsmUnavailable, Pkcs11Hsm
from kms.errors import KeyIntegrityError, ServiceUnavailable
from kms.models import service_key_id

_VERSION = 1


class Sealer:
    def __init__(self, *, hsm: Pkcs11Hsm):
        self._hsm = hsm

    @staticmethod
    def _key(s: Session) -> bytes:
        return service_key_id(s, "secrets-kek")

    def seal(self, s: Session, data: bytes, *, aad: bytes) -> bytes:
        iv = os.urandom(GCM_IV_BYTES)
        try:
            return bytes([_VERSION]) + iv + self._hsm.gcm_encrypt(self._key(s), data, iv=iv,
                                                                  aad=aad)
        except HsmUnavailable as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc

    def unseal(self, s: Session, blob: bytes, *, aad: bytes) -> bytes:
        if len(blob) < 1 + GCM_IV_BYTES + 16 or blob[0] != _VERSION:
            raise KeyIntegrityError("malformed sealed secret")
        try:
            return self._hsm.gcm_decrypt(self._key(s), blob[1 + GCM_IV_BYTES:],
                                         iv=blob[1:1 + GCM_IV_BYTES], aad=aad)
        except HsmDecryptFailed as exc:
            raise KeyIntegrityError("sealed secret does not match its owner") from exc
        except HsmUnavailable as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc
