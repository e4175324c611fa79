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


def counter_label(tenant_id: str, key_name: str, version: int) -> str:
    return f"{tenant_label_prefix(tenant_id)}ctr/appkey/{key_name}/v{version}"


class UsageLimiter:
    def __init__(self, *, hsm: Pkcs11Hsm, cap: int, block: int = BLOCK):
        self._hsm, self.cap, self._block = hsm, cap, block
        self._lock = threading.Lock()
        # (tenant, key id, version) -> [next, limit): counts this process has reserved.
        # The tenant is part of the key: SQLite may hand an erased tenant's key id to a
        # new key of another tenant.
        self._ranges: dict[tuple[str, int, int], list[int]] = {}

    def try_take_local(self, tenant_id: str, key_id: int, version: int, n: int) -> bool:
        with self._lock:
            r = self._ranges.get((tenant_id, key_id, version))
            if r is not None and r[1] - r[0] >= n:
                r[0] += n
                return True
            return False

    def reserve(self, s: Session, *, tenant_id: str, key_name: str, row: AppKeyVersion,
                n: int) -> bool:
        """Reserve at least `n` counts for this version inside the caller's write
        transaction; False when the cap would be passed (the caller rotates)."""
        label = counter_label(tenant_id, key_name, row.version)
        try:
            high = max(row.encryptions, self._hsm.read_counter(label))
            grant = max(n, min(self._block, self.cap - high))
            if high + grant > self.cap:
                row.encryptions = high
                return False
            self._hsm.raise_counter(label, high + grant)
        except HsmError as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc
        row.encryptions = high + grant
        with self._lock:
            self._ranges[(tenant_id, row.key_id, row.version)] = [high + n, high + grant]
        return True

    def forget(self, tenant_id: str) -> None:
        with self._lock:
            for k in [k for k in self._ranges if k[0] == tenant_id]:
                del self._ranges[k]
