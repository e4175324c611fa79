"""Application encryption: AES-256-GCM in process, under one version of an app key.

Ciphertext string (format owned by this module):

    kms:v<version>:<standard base64 of nonce (12 bytes) || ciphertext || tag (16 bytes)>

AAD = "kms-app:v1" followed by three length-prefixed fields: key name, version, and the
caller's context (empty when none). Every failure to open a ciphertext, whatever its
cause (format, unknown version, tag), is one opaque `DecryptionFailed`.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pybase64
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.errors import DecryptionFailed

NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
_PREFIX = re.compile(r"kms:v([1-9][0-9]{0,9}):([A-Za-z0-9+/=]+)")


@dataclass(frozen=True)
class ParsedCiphertext:
    version: int
    nonce: bytes
    sealed: bytes  # ciphertext || tag


def app_aad(*, key_name: str, version: int, context: bytes) -> bytes:
    return app_aad_prefix(key_name=key_name, version=version) + _field(context)


def app_aad_prefix(*, key_name: str, version: int) -> bytes:
    """The part of the AAD shared by every item of a batch under one version."""
    return b"kms-app:v1" + _field(key_name.encode()) + _field(str(version).encode())


def app_aad_with(prefix: bytes, context: bytes) -> bytes:
    """`app_aad` from a prefix of `app_aad_prefix`."""
    return prefix + _field(context)


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def seal(aead: AESGCM, plaintext: bytes, *, aad: bytes, nonce: bytes | None = None) -> bytes:
    """Return nonce || ciphertext || tag. `nonce` is injectable for test vectors only."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise ValueError("nonce must be 96 bits")
    return nonce + aead.encrypt(nonce, plaintext, aad)


def seal_formatted(aead: AESGCM, version: int, prefix: bytes,
                   items: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """`format_ciphertext(version, seal(aead, plaintext, aad=app_aad_with(prefix,
    context)))` for every (plaintext, context) of a batch under one version, with the
    nonces drawn from the OS CSPRNG in one call (12 random bytes each, as `seal` draws
    them): one system call a batch instead of one an item."""
    n = NONCE_BYTES
    nonces = os.urandom(n * len(items))
    head = f"kms:v{version}:"
    no_context = prefix + _field(b"")
    encrypt, b64 = aead.encrypt, pybase64.b64encode_as_string
    out = []
    for i, (plaintext, context) in enumerate(items):
        nonce = nonces[i * n:(i + 1) * n]
        aad = prefix + _field(context) if context else no_context
        out.append(head + b64(nonce + encrypt(nonce, plaintext, aad)))
    return out


def open_sealed(aead: AESGCM, blob: bytes, *, aad: bytes) -> bytes:
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionFailed()
    try:
        return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptionFailed() from None


def format_ciphertext(version: int, blob: bytes) -> str:
    return f"kms:v{version}:{pybase64.b64encode_as_string(blob)}"


def parse_ciphertext(text: str) -> tuple[int, bytes]:
    """Return (version, nonce || ciphertext || tag); DecryptionFailed for anything else."""
    m = _PREFIX.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise DecryptionFailed()
    try:
        blob = b64decode_canonical(m.group(2))
    except ValueError:
        raise DecryptionFailed() from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionFailed()
    return int(m.group(1)), blob


def b64decode_canonical(text: str) -> bytes:
    """Strict standard base64 (alphabet, padding, nothing after it) in its one canonical
    spelling, the one `pybase64.b64encode` writes: unused low bits set in the last
    character would otherwise spell the same bytes several ways (ciphertexts, and the
    contexts they are bound to). ValueError otherwise (binascii.Error is one)."""
    raw = pybase64.b64decode(text, validate=True)
    if pybase64.b64encode_as_string(raw) != text:
        raise ValueError("not canonical base64")
    return raw
