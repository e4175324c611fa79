"""Clocks. Production reads the system clock; tests inject a movable one."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant, timezone-aware UTC."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class FixedClock:
    """A clock that only moves when told to (tests, `kms erasure run` under a fake time)."""

    def __init__(self, start: datetime):
        self._now = require_aware(start)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now = self._now + delta

    def set(self, instant: datetime) -> None:
        with self._lock:
            self._now = require_aware(instant)


def require_aware(instant: datetime) -> datetime:
    """Return the instant in UTC; raise ValueError for a naive datetime."""
    if instant.tzinfo is None or instant.tzinfo.utcoffset(instant) is None:
        raise ValueError("naive datetime refused: timestamps must carry a timezone")
    return instant.astimezone(timezone.utc)
