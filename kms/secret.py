"""Key material that cannot be printed, logged or pickled by accident."""

from __future__ import annotations

import hmac
from typing import NoReturn


class SecretBytes:
    """Holds key bytes; `repr`/`str` show no bytes and pickling is refused.

    Call `reveal()` only where the bytes must leave: the response of the two endpoints
    whose job is to return a key."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"SecretBytes(<{len(self._value)} bytes hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretBytes) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        raise TypeError("key material is not hashable")
