"""Operator passwords: Argon2id (argon2-cffi) with the RFC 9106 low-memory profile.

Passwords are NFC-normalised before hashing; at least 12 characters, at most 4,096.
`verify` returns True or False and never raises, whatever the stored hash holds, so that
a corrupted hash answers like a wrong password. Only hashes are stored (SecNumCloud 10.3).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import RFC_9106_LOW_MEMORY

from kms.errors import InvalidRequest

MIN_LENGTH = 12
MAX_LENGTH = 4096


@dataclass(frozen=True)
class Argon2Parameters:
    time_cost: int = RFC_9106_LOW_MEMORY.time_cost  # 3
    memory_kib: int = RFC_9106_LOW_MEMORY.memory_cost  # 65536 (64 MiB)
    parallelism: int = RFC_9106_LOW_MEMORY.parallelism  # 4


def normalize_password(password: str) -> str:
    """NFC form; raises InvalidRequest when outside the length policy."""
    if not isinstance(password, str):
        raise InvalidRequest("password must be text", field="password")
    normalized = unicodedata.normalize("NFC", password)
    if len(normalized) < MIN_LENGTH:
        raise InvalidRequest(f"password must have at least {MIN_LENGTH} characters",
                             field="password")
    if len(normalized) > MAX_LENGTH:
        raise InvalidRequest(f"password must have at most {MAX_LENGTH} characters",
                             field="password")
    return normalized


class Passwords:
    def __init__(self, params: Argon2Parameters | None = None):
        p = params or Argon2Parameters()
        self._hasher = PasswordHasher(time_cost=p.time_cost, memory_cost=p.memory_kib,
                                      parallelism=p.parallelism, hash_len=32,
                                      salt_len=RFC_9106_LOW_MEMORY.salt_len, type=Type.ID)
        self._dummy = self._hasher.hash("dummy password for unknown users")

    def __repr__(self) -> str:
        return "Passwords(argon2id)"

    def hash(self, password: str) -> str:
        return self._hasher.hash(normalize_password(password))

    def verify(self, stored: str, password: str) -> bool:
        try:
            candidate = unicodedata.normalize("NFC", password)
            return bool(self._hasher.verify(stored, candidate))
        except (VerifyMismatchError, VerificationError, InvalidHashError, ValueError, TypeError):
            return False

    def verify_dummy(self, password: str) -> None:
        """Spend the time of a real verification, for users that do not exist."""
        self.verify(self._dummy, password)

    def needs_rehash(self, stored: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(stored)
        except (InvalidHashError, ValueError):
            return False
