"""Work run directly on an asyncio event loop must never wait.

The API runs the data plane's short, read-only work on the event loop (no thread-pool
hop). Inside `inline()`, anything that could wait (a database write or a remote database,
the token's lock held by another thread, a token that needs opening) raises `WouldBlock`
*before* it has changed anything, and the caller runs the whole operation again in a
thread. Code that is not inline is unaffected.

Lives in `hsm` because it is the lowest layer that has to ask; it knows nothing of HTTP.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class WouldBlock(Exception):
    """Raised inline where the work would wait; nothing has been changed yet."""


# None outside inline work; inside, the futures (asyncio's or concurrent.futures') the
# caller must await before answering.
_pending: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "kms_inline_pending", default=None)


def active() -> bool:
    return _pending.get() is not None


def may_block() -> None:
    """Raise WouldBlock when running inline."""
    if _pending.get() is not None:
        raise WouldBlock()


def defer(future: Any) -> bool:
    """Inline: hand `future` to the caller to await, and return True. Else False."""
    pending = _pending.get()
    if pending is None:
        return False
    pending.append(future)
    return True


@contextmanager
def inline() -> Iterator[list[Any]]:
    pending, token = enter()
    try:
        yield pending
    finally:
        leave(token)


def enter() -> tuple[list[Any], contextvars.Token[list[Any] | None]]:
    """`inline()` without a context manager, for the hot path (`api.run`): start inline
    work; returns its pending futures and the token to pass to `leave`."""
    pending: list[Any] = []
    return pending, _pending.set(pending)


def leave(token: contextvars.Token[list[Any] | None]) -> None:
    _pending.reset(token)
