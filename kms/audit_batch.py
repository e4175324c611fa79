"""Group commit for data-plane audit events: callers wait for the commit of the batch
that holds their event, so nothing is lost and one transaction serves many requests."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
from concurrent.futures import Future, InvalidStateError

from hsm import inline
from kms.audit import COMMIT_WITHIN_SECONDS, AuditJournal, PendingEvent
from kms.db import Database
from kms.errors import KmsError, ServiceUnavailable

Waiter = Future[None] | asyncio.Future[None]
MAX_BATCH = 512
WAIT_SECONDS = COMMIT_WITHIN_SECONDS + 1.0  # the journal drops what is later than that


class AuditBatcher:
    """One writer thread commits whatever events are waiting, in one transaction.

    When to commit: a thread's event wakes the writer at once. Events submitted inline
    on an event loop wake it with a callback scheduled on that loop (`call_soon`), which
    runs once the loop has finished its current round of ready work: every request that
    round started is in the same commit, and a lone request (c=1) waits for nothing.
    That callback also sets one timer for the round's requests: any still waiting after
    WAIT_SECONDS gets ServiceUnavailable, so they need no timeout each."""

    def __init__(self, *, db: Database, journal: AuditJournal, enabled: bool = True):
        self._db, self._journal, self.enabled = db, journal, enabled
        self._pending: collections.deque[tuple[PendingEvent, Waiter]] = collections.deque()
        self._wake = threading.Event()
        # Per event loop, the futures of its current round, until its kick runs.
        self._rounds: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self._pid = 0
        self.commits = self.committed_events = 0  # counters, for measurements

    def submit(self, event: PendingEvent) -> None:
        """Return once the event is committed; ServiceUnavailable if it cannot be.
        Inline (on the event loop, `hsm.inline`), return at once with an asyncio future
        handed to the caller, who must await it before it answers."""
        if not self.enabled:
            return
        self._ensure_thread()
        if inline.active():
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:  # inline but not on a loop (tests): a thread's future
                loop = None
            if loop is None:
                thread_waiter: Future[None] = Future()
                self._pending.append((event, thread_waiter))
                inline.defer(thread_waiter)
                self._wake.set()
                return
            waiter = loop.create_future()
            self._pending.append((event, waiter))
            inline.defer(waiter)
            round_ = self._rounds.get(loop)
            if round_ is None:
                round_ = self._rounds[loop] = []
                loop.call_soon(self._kick, loop)
            round_.append(waiter)
            return
        done: Future[None] = Future()
        self._pending.append((event, done))
        self._wake.set()
        try:
            done.result(timeout=WAIT_SECONDS)
        except KmsError:
            raise
        except Exception as exc:
            raise ServiceUnavailable("the audit journal cannot be written") from exc

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        """End of the loop's round: wake the writer for its events, and bound their wait
        with one timer for the whole round (not one per request)."""
        round_ = self._rounds.pop(loop, [])
        self._wake.set()
        if round_:  # any still waiting then: a 503 (done ones are left alone)
            loop.call_later(WAIT_SECONDS, _resolve_on_loop, round_,
                            ServiceUnavailable("the audit journal cannot be written"))

    def _ensure_thread(self) -> None:
        if self._running and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                if self._pid != os.getpid():  # a forked child: the parent's are not ours
                    self._pending, self._wake = collections.deque(), threading.Event()
                    self._rounds = {}
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="audit-batcher",
                                                daemon=True)
                self._running = True
                self._thread.start()

    def _run(self) -> None:
        try:
            self._write_forever()
        finally:
            self._running = False

    def _write_forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()  # before draining: a later submit wakes the next round
            while self._pending:
                batch: list[tuple[PendingEvent, Waiter]] = []
                while self._pending and len(batch) < MAX_BATCH:
                    batch.append(self._pending.popleft())
                error: BaseException | None = None
                refused: list[KmsError | None] = [None] * len(batch)
                try:
                    refused = self._journal.append_direct(self._db,
                                                          [event for event, _ in batch])
                    self.commits += 1
                    self.committed_events += refused.count(None)
                except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                    error = exc
                _resolve([w for (_, w), r in zip(batch, refused, strict=True) if r is None],
                         error)
                for (_, w), r in zip(batch, refused, strict=True):
                    if r is not None:  # what its release needed no longer holds
                        _resolve([w], r)
                if error is not None and not isinstance(error, Exception):
                    raise error  # KeyboardInterrupt, SystemExit: after the waiters have it


def _resolve(waiters: list[Waiter], exc: BaseException | None) -> None:
    """Wake every waiter: threads directly, event loops with one callback each."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for w in waiters:
        if isinstance(w, Future):
            if not w.done():  # cancelled by its waiter
                with contextlib.suppress(InvalidStateError):
                    if exc is None:
                        w.set_result(None)
                    else:
                        w.set_exception(exc)
        else:
            by_loop.setdefault(w.get_loop(), []).append(w)
    for loop, futures in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(_resolve_on_loop, futures, exc)


def _resolve_on_loop(futures: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for f in futures:
        if not f.done():  # a request that timed out or was cancelled
            if exc is None:
                f.set_result(None)
            else:
                f.set_exception(exc)
