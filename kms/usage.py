"""Encryption counters per application-key version (SP 800-38D: a GCM key with random
IVs must stay well below 2^32 encryptions).

Counts are reserved in blocks: the high-water mark is written to the token first (as a
monotonic counter object under the tenant's label prefix), then to the database, in one
write transaction holding the version's row. A database restored from an old backup
therefore cannot make a version encrypt again past its cap: the token remembers.
"""

from __future__ import annotations

import threading

from sqlalchemy.orm import Session

from hsm import HsmError, Pkcs11Hsm
from kms.errors import ServiceUnavailable
from kms.keyring import tenant_label_prefix
from kms.models import AppKeyVersion

BLOCK = 4096
# A block holds at least this many of the largest request seen under its version, so
# that the quarter left when the next block is asked for lasts several such requests:
# a block of 4,096 counts served four batches of 1,000, and the fifth found no spare
# yet and reserved in the foreground (a write: off the event loop, through the thread
# pool). At most one block per version is lost when a process stops.
BLOCK_REQUESTS = 16


def counter_label(tenant_id: str, key_name: str, version: int) -> str:
    return f"{tenant_label_prefix(tenant_id)}ctr/appkey/{key_name}/v{version}"


Key = tuple[str, int, int]  # (tenant, key id, version)


class UsageLimiter:
    """Per-process blocks of encryption counts. When the current block runs low, the next
    one is reserved in the background (`wants_refill` / `reserve(spare=True)`), so the data
    plane never waits for the token and the database on its hot path."""

    def __init__(self, *, hsm: Pkcs11Hsm, cap: int, block: int = BLOCK):
        self._hsm, self.cap, self._block = hsm, cap, block
        self._lock = threading.Lock()
        # (tenant, key id, version) -> [next, limit): counts this process has reserved.
        # The tenant is part of the key: SQLite may hand an erased tenant's key id to a
        # new key of another tenant.
        self._ranges: dict[Key, list[int]] = {}
        self._spares: dict[Key, list[int]] = {}  # the next block, reserved ahead
        self._refilling: set[Key] = set()
        self._demand: dict[Key, int] = {}  # the largest request seen under each version

    def _size(self, k: Key, n: int) -> int:
        """Counts per block for this version, having seen a request of `n` (under the
        lock)."""
        demand = max(n, self._demand.get(k, 0))
        if demand:
            self._demand[k] = demand
        return max(self._block, BLOCK_REQUESTS * demand)

    def try_take_local(self, tenant_id: str, key_id: int, version: int, n: int) -> bool:
        k = (tenant_id, key_id, version)
        with self._lock:
            self._size(k, n)
            r = self._ranges.get(k)
            if r is None or r[1] - r[0] < n:
                spare = self._spares.get(k)
                if spare is None or spare[1] - spare[0] < n:
                    return False
                r = self._ranges[k] = self._spares.pop(k)  # the rest of the old one is burnt
            r[0] += n
            return True

    def wants_refill(self, tenant_id: str, key_id: int, version: int) -> bool:
        """True (once, until `refill_done`) when the current block is below a quarter and
        no spare block is reserved yet: the caller reserves one in the background."""
        k = (tenant_id, key_id, version)
        with self._lock:
            r = self._ranges.get(k)
            if r is None or k in self._spares or k in self._refilling \
                    or r[1] - r[0] >= self._size(k, 0) // 4:
                return False
            self._refilling.add(k)
            return True

    def refill_done(self, tenant_id: str, key_id: int, version: int) -> None:
        with self._lock:
            self._refilling.discard((tenant_id, key_id, version))

    def reserve(self, s: Session, *, tenant_id: str, key_name: str, row: AppKeyVersion,
                n: int, spare: bool = False) -> bool:
        """Reserve at least `n` counts for this version inside the caller's write
        transaction; False when the cap would be passed (the caller rotates). With
        `spare`, the block is kept for when the current one runs out."""
        label = counter_label(tenant_id, key_name, row.version)
        k = (tenant_id, row.key_id, row.version)
        with self._lock:
            size = self._size(k, n)
        try:
            high = max(row.encryptions, self._hsm.read_counter(label))
            grant = max(n, min(size, self.cap - high))
            if high + grant > self.cap or grant <= 0:
                row.encryptions = high
                return False
            self._hsm.raise_counter(label, high + grant)
        except HsmError as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc
        row.encryptions = high + grant
        with self._lock:
            if spare:
                self._spares[k] = [high, high + grant]
            else:
                self._ranges[k] = [high + n, high + grant]
        return True

    def forget(self, tenant_id: str) -> None:
        with self._lock:
            tables: tuple[dict[Key, list[int]] | dict[Key, int], ...] = (
                self._ranges, self._spares, self._demand)
            for table in tables:
                for k in [k for k in table if k[0] == tenant_id]:
                    del table[k]
