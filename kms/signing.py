"""Signed documents: canonical JSON signed in the token with the service's ECDSA P-256
key, verifiable by anyone with OpenSSL:

    openssl dgst -sha256 -verify kms-public.pem -signature FILE.sig FILE
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from hsm import HsmUnavailable, Pkcs11Hsm
from kms.errors import ServiceUnavailable
from kms.models import service_key_id

SIGNATURE_ALGORITHM = "ECDSA-P256-SHA256"


def canonical_json(document: dict[str, Any]) -> bytes:
    """Sorted keys, no insignificant white space, UTF-8; no floats in our documents."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


class ServiceSigner:
    def __init__(self, *, hsm: Pkcs11Hsm):
        self._hsm = hsm

    @staticmethod
    def _key_id(session: Session) -> bytes:
        return service_key_id(session, "signing")

    def sign(self, session: Session, data: bytes) -> bytes:
        try:
            return self._hsm.sign_p256(self._key_id(session), data)
        except HsmUnavailable as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc

    def _public_der(self, session: Session) -> bytes:
        try:
            return self._hsm.public_key_der(self._key_id(session))
        except HsmUnavailable as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc

    def public_key_pem(self, session: Session) -> str:
        der = self._public_der(session)
        key = serialization.load_der_public_key(der)
        return key.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def key_fingerprint(self, session: Session) -> str:
        return "sha256:" + hashlib.sha256(self._public_der(session)).hexdigest()

    def verify(self, session: Session, data: bytes, signature: bytes) -> bool:
        key = serialization.load_der_public_key(self._public_der(session))
        assert isinstance(key, ec.EllipticCurvePublicKey)
        try:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return True
        except InvalidSignature:
            return False
