"""Plaintext keys kept in a process's memory: a bounded LRU, optionally with a time limit.

Keys of the cache are tuples whose first item is the tenant id and whose last is the
tenant's epoch when the value was stored (DESIGN: any plaintext key held in memory is
dropped when the tenant changes state; every state change bumps the epoch, so an entry
of an older epoch is never served, and `sweep` forgets it)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from sqlalchemy import select

from kms.db import Database
from kms.models import Tenant

V = TypeVar("V")
CacheKey = tuple[Hashable, ...]


class KeyCache(Generic[V]):
    """LRU of at most `capacity` values; with `ttl` (seconds), a value is served for at
    most that long after it was stored (a hit does not extend it). `capacity` 0 or `ttl`
    0 keeps nothing."""

    def __init__(self, capacity: int, *, ttl: float | None = None,
                 now: Callable[[], float] = time.monotonic):
        self.capacity, self.ttl, self._now = capacity, ttl, now
        self._items: OrderedDict[CacheKey, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyCache(entries={len(self._items)}, capacity={self.capacity}, ttl={self.ttl})"

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.ttl != 0

    def get(self, k: CacheKey) -> V | None:
        with self._lock:
            found = self._items.get(k)
            if found is None:
                return None
            if self.ttl is not None and not 0 <= self._now() - found[0] < self.ttl:
                del self._items[k]
                return None
            self._items.move_to_end(k)
            return found[1]

    def put(self, k: CacheKey, value: V) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._items[k] = (self._now(), value)
            self._items.move_to_end(k)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop_where(self, gone: Callable[[CacheKey], bool]) -> int:
        with self._lock:
            keys = [k for k in self._items if gone(k)]
            for k in keys:
                del self._items[k]
            return len(keys)

    def drop(self, tenant_id: str) -> int:
        return self.drop_where(lambda k: k[0] == tenant_id)

    def expire(self) -> int:
        """Forget the values past their time limit."""
        if self.ttl is None:
            return 0
        now, ttl = self._now(), self.ttl
        with self._lock:
            keys = [k for k, (at, _) in self._items.items() if not 0 <= now - at < ttl]
            for k in keys:
                del self._items[k]
            return len(keys)

    def keys(self) -> list[CacheKey]:
        with self._lock:
            return list(self._items)

    def tenant_epochs(self) -> dict[str, set[int]]:
        with self._lock:
            out: dict[str, set[int]] = {}
            for k in self._items:
                out.setdefault(str(k[0]), set()).add(int(str(k[-1])))
            return out

    def sweep(self, db: Database) -> tuple[int, set[str]]:
        """Forget what expired, and what belongs to an older epoch of its tenant or to a
        tenant no longer usable (a state change made by another process: another
        replica, `kms erasure run`). Returns (how many were dropped, the tenants no longer
        usable)."""
        dropped = self.expire()
        live = self.tenant_epochs()
        if not live:
            return dropped, set()
        with db.read() as s:
            current = {t.id: (t.epoch, t.status) for t in
                       s.scalars(select(Tenant).where(Tenant.id.in_(list(live))))}
        unusable: set[str] = set()
        for tenant_id, epochs in live.items():
            epoch, status = current.get(tenant_id, (None, "erased"))
            if status not in ("active", "notice"):
                unusable.add(tenant_id)
                dropped += self.drop(tenant_id)
            elif epochs - {epoch}:
                stale = epochs - {epoch}
                dropped += self.drop_where(lambda k, t=tenant_id, e=stale:  # type: ignore[misc]
                                           k[0] == t and k[-1] in e)
        return dropped, unusable
