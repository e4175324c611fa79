"""Group commit for data-plane audit events: callers wait for the commit of the batch
that holds their event, so nothing is lost and one transaction serves many requests."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from concurrent.futures import Future, InvalidStateError

from hsm import inline
from kms.audit import AuditJournal, PendingEvent
from kms.db import Database
from kms.errors import KmsError, ServiceUnavailable

MAX_BATCH = 512
WAIT_SECONDS = 10.0


class AuditBatcher:
    def __init__(self, *, db: Database, journal: AuditJournal, enabled: bool = True):
        self._db, self._journal, self.enabled = db, journal, enabled
        self._queue: queue.Queue[tuple[PendingEvent, Future[None]]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(self, event: PendingEvent) -> None:
        """Return once the event is committed; ServiceUnavailable if it cannot be.
        Inline (on the event loop, `hsm.inline`), return at once and leave the wait to
        the caller, who must await the future before it answers."""
        if not self.enabled:
            return
        self._ensure_thread()
        done: Future[None] = Future()
        self._queue.put((event, done))
        if inline.defer(done):
            return  # on the event loop: the route awaits `done` before it answers
        try:
            done.result(timeout=WAIT_SECONDS)
        except KmsError:
            raise
        except Exception as exc:
            raise ServiceUnavailable("the audit journal cannot be written") from exc

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._queue = queue.Queue() if self._pid != os.getpid() else self._queue
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="audit-batcher",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._journal.append_direct(self._db, [event for event, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, done in batch:
                    _settle(done, exc)
            else:
                for _, done in batch:
                    _settle(done, None)


def _settle(done: Future[None], exc: BaseException | None) -> None:
    if done.done():  # cancelled by its waiter
        return
    with contextlib.suppress(InvalidStateError):
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)
