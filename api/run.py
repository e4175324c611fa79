"""How a route calls the service: inline on the event loop when it can, else in a thread.

The data plane's work is short and CPU-bound (a primary-key read of SQLite, AES-GCM in
process, a token call that takes microseconds): handing it to the thread pool costs more
than doing it. So a route first runs it on the loop inside `hsm.inline.inline()`, where
anything that could wait raises `WouldBlock` before it has changed anything, and then
runs it again in the thread pool. Journal events submitted inline are awaited here,
before the answer leaves: no key is released before its event is committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from hsm import inline
from kms.audit_batch import WAIT_SECONDS
from kms.errors import KmsError, ServiceUnavailable

T = TypeVar("T")


async def run(fn: Callable[[], T], *, offload: bool = False) -> T:
    """`fn()` inline, or in the thread pool when it would block (or when `offload`: work
    that writes or may take long goes straight to a thread)."""
    if offload:
        return await run_in_threadpool(fn)
    blocked = False
    error: BaseException | None = None
    result: Any = None
    pending, token = inline.enter()  # inline.inline(), without contextlib's cost
    try:
        result = fn()
    except inline.WouldBlock:
        blocked = True
    except Exception as exc:  # noqa: BLE001 - re-raised once the journal has answered
        error = exc
    finally:
        inline.leave(token)
    if pending:
        await _settle(pending)
    if error is not None:
        raise error
    if blocked:
        return await run_in_threadpool(fn)
    return result  # type: ignore[no-any-return]


async def _settle(pending: list[Any]) -> None:
    """Wait for the commit of every journal event submitted inline. The batcher bounds the
    wait of an event loop's futures itself (one timer per round, `AuditBatcher._kick`);
    a thread's future gets a timeout here."""
    for future in pending:
        try:
            if isinstance(future, asyncio.Future):
                await future
            else:
                async with asyncio.timeout(WAIT_SECONDS):
                    await asyncio.wrap_future(future)
        except KmsError:
            raise
        except Exception as exc:
            raise ServiceUnavailable("the audit journal cannot be written") from exc
