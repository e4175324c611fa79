"""The data plane runs inline on the event loop (`hsm.inline`, `api.run`): whatever would
wait raises WouldBlock before it changes anything and the work is redone in a thread;
journal events submitted inline are committed before the answer leaves."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.run import run
from hsm import inline
from kms.config import Settings
from kms.db import Database
from kms.errors import ServiceUnavailable
from kms.models import AppKey, AppKeyVersion
from tests.conftest import populate


def _event_count(k: Any) -> int:
    with k.db.read() as s:
        from kms.audit import AuditJournal

        return AuditJournal.count(s)


def test_writes_and_remote_reads_refuse_to_run_inline(kms) -> None:  # type: ignore[no-untyped-def]
    pg = Database("postgresql+psycopg://nobody@127.0.0.1:9/none")
    with inline.inline():
        with kms.db.read() as s:  # SQLite WAL reads do not wait for writers
            assert s is not None
        assert kms.db.fetchone("SELECT 1", ()) == (1,)
        with pytest.raises(inline.WouldBlock), kms.db.write():
            pass
        with pytest.raises(inline.WouldBlock):
            pg.fetchone(pg.sql("SELECT ?"), (1,))  # a network round trip: not on the loop
    with kms.db.write():  # outside inline nothing changes
        pass


def test_a_token_busy_elsewhere_is_not_waited_for_inline(kms) -> None:  # type: ignore[no-untyped-def]
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with kms.hsm.exclusive():
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        started = time.monotonic()
        with inline.inline(), pytest.raises(inline.WouldBlock):
            kms.hsm.token_info()
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        t.join()
    assert kms.hsm.token_info().label  # and outside inline it works


def test_inline_work_that_would_write_changes_nothing_before_it_stops(kms) -> None:  # type: ignore[no-untyped-def]
    tid, callers, _ = populate(kms, "inline refill", volumes=0, keys=1)
    app = callers["app"]
    before = _event_count(kms)
    def reserved_counts() -> int:
        with kms.db.read() as s:
            return s.scalars(select(AppKeyVersion.encryptions).join(
                AppKey, AppKey.id == AppKeyVersion.key_id).where(AppKey.tenant_id == tid)).one()

    reserved = reserved_counts()
    with inline.inline() as pending, pytest.raises(inline.WouldBlock):
        # The first encryption must reserve counts (a write): it stops before any change.
        kms.transit.encrypt(app, "key-0", b"x")
    assert pending == [] and _event_count(kms) == before
    assert reserved_counts() == reserved
    kms.transit.encrypt(app, "key-0", b"x")  # in a thread (here: plainly) it reserves
    with inline.inline() as pending:
        ciphertext, version = kms.transit.encrypt(app, "key-0", b"y")
    assert len(pending) == 1, "the event is handed to the caller to await"
    pending[0].result(timeout=10)
    assert kms.transit.decrypt(app, "key-0", ciphertext).reveal() == b"y" and version == 1


def test_no_answer_leaves_before_its_event_is_committed(settings, kms) -> None:  # type: ignore[no-untyped-def]
    from cli.wiring import build_kms

    k = build_kms(settings)
    _tid, callers, _ = populate(k, "inline slow journal", volumes=1, keys=0)
    original = k.audit.append_direct

    def slow(db: Any, events: Any) -> list[bool]:
        time.sleep(0.3)
        return original(db, events)

    k.audit.append_direct = slow  # type: ignore[method-assign]
    before = _event_count(k)
    key = asyncio.run(run(lambda: k.volumes.fetch_key(callers["hypervisor"], "vol-0")))
    assert len(key.key.reveal()) == 64
    assert _event_count(k) == before + 1, "run() returned before the event was committed"

    def broken(db: Any, events: Any) -> None:
        raise RuntimeError("disk full")

    k.audit.append_direct = broken  # type: ignore[method-assign]
    with pytest.raises(ServiceUnavailable):
        asyncio.run(run(lambda: k.volumes.fetch_key(callers["hypervisor"], "vol-0")))
    k.db.dispose()


def test_the_api_falls_back_to_a_thread_while_the_token_is_busy(settings, kms) -> None:  # type: ignore[no-untyped-def]
    _tid, _callers, tokens = populate(kms, "inline fallback", volumes=1, keys=0)
    auth = {"Authorization": f"Bearer {tokens['hypervisor']}"}
    with TestClient(create_app(Settings(), kms), raise_server_exceptions=False) as c:
        first = c.post("/v1/volumes/vol-0/key", headers=auth)
        assert first.status_code == 200
        held, release = threading.Event(), threading.Event()

        def holder() -> None:
            with kms.hsm.exclusive():
                held.set()
                release.wait(10)

        t = threading.Thread(target=holder)
        t.start()
        held.wait(5)
        threading.Timer(0.3, release.set).start()
        r = c.post("/v1/volumes/vol-0/key", headers=auth)  # waits in a thread, not on the loop
        t.join()
        assert r.status_code == 200 and r.json()["key"] == first.json()["key"]


def test_the_next_block_of_counts_is_reserved_off_the_request_path(  # type: ignore[no-untyped-def]
        settings, kms, monkeypatch) -> None:
    from cli.wiring import build_kms
    from kms.usage import counter_label

    monkeypatch.setattr("kms.usage.BLOCK_REQUESTS", 1)  # blocks of exactly `_block`

    k = build_kms(settings)
    tid, callers, _ = populate(k, "inline prefetch", volumes=0, keys=1)
    app = callers["app"]
    k.limiter._block = 8
    k.transit.encrypt(app, "key-0", b"a")  # foreground: reserves counts 0..7, uses 1
    for _ in range(6):  # down to one left: below a quarter, the next block is prefetched
        k.transit.encrypt(app, "key-0", b"b")
    assert k.transit._refiller is not None
    k.transit._refiller.submit(lambda: None).result(timeout=10)  # the refill has run
    assert k.hsm.read_counter(counter_label(tid, "key-0", 1)) == 16
    for _ in range(8):  # the spare block serves them inline: no write, no WouldBlock
        with inline.inline() as pending:
            k.transit.encrypt(app, "key-0", b"c")
        for f in pending:
            f.result(timeout=10)
    key = k.transit._lookup(app, "key-0", None)[0]
    k.lifecycle.suspend(tid)  # no block is reserved for a tenant that is not usable
    k.transit._refill(key, 1)
    assert k.hsm.read_counter(counter_label(tid, "key-0", 1)) <= 24
    assert not k.limiter._spares
    k.db.dispose()


def test_blocks_grow_with_the_request_so_batches_stay_on_the_loop(settings, kms) -> None:  # type: ignore[no-untyped-def]
    """A block lasts many requests of the largest size seen: the next one is asked for
    while several such requests are still covered, and every batch after the first is
    served inline (no foreground reservation, no WouldBlock)."""
    from cli.wiring import build_kms
    from kms.usage import BLOCK_REQUESTS, counter_label

    k = build_kms(settings)
    tid, callers, _ = populate(k, "inline batch blocks", volumes=0, keys=1)
    app = callers["app"]
    k.limiter._block = 8
    items = [(b"x", b"")] * 4
    k.transit.encrypt_batch(app, "key-0", items)  # foreground: reserves a block
    label = counter_label(tid, "key-0", 1)
    assert k.hsm.read_counter(label) == BLOCK_REQUESTS * 4  # not the configured 8
    asked_with_left = None
    for _ in range(2 * BLOCK_REQUESTS):
        with inline.inline() as pending:
            k.transit.encrypt_batch(app, "key-0", items)  # raises WouldBlock if not inline
        for f in pending:
            f.result(timeout=10)
        if k.transit._refiller is not None:
            if asked_with_left is None:
                r = next(v for kk, v in k.limiter._ranges.items() if kk[0] == tid)
                asked_with_left = r[1] - r[0]
            k.transit._refiller.submit(lambda: None).result(timeout=10)
    assert asked_with_left is not None and asked_with_left >= 3 * 4
    assert k.hsm.read_counter(label) >= (2 * BLOCK_REQUESTS + 1) * 4
    k.db.dispose()


def test_a_request_on_the_loop_waits_a_bounded_time_for_its_commit(kms, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The batcher bounds the wait of each loop round's requests with one timer (not a
    timeout per request): a commit that does not come in WAIT_SECONDS is a 503, and the
    late commit afterwards writes none of their events (no release is journaled that its
    caller was told failed). Fault injection wraps the real journal."""
    from api.run import _settle
    from kms import audit, audit_batch
    from kms.audit_batch import AuditBatcher

    release = threading.Event()

    class StuckJournal:  # the real journal, whose commits wait until released
        def append_direct(self, db: Any, events: Any) -> Any:
            release.wait(10)
            return kms.audit.append_direct(db, events)

    monkeypatch.setattr(audit_batch, "WAIT_SECONDS", 0.3)
    monkeypatch.setattr(audit, "COMMIT_WITHIN_SECONDS", 0.2)
    batcher = AuditBatcher(db=kms.db, journal=StuckJournal())  # type: ignore[arg-type]
    before = _event_count(kms)

    async def request() -> float:
        with inline.inline() as pending:
            for n in range(3):  # one round, three requests
                batcher.submit(kms.audit.pending(action="test.stuck", tenant_id=None,
                                                 object=f"n:{n}"))
        assert len(pending) == 3
        t0 = time.monotonic()
        for future in pending:
            with pytest.raises(ServiceUnavailable):
                await _settle([future])
        return time.monotonic() - t0

    waited = asyncio.run(request())
    assert 0.25 < waited < 3
    release.set()
    deadline = time.monotonic() + 10
    while batcher._pending and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the late commit has run by then
    assert _event_count(kms) == before, "a request answered 503 has no event"
    # and the batcher goes on: a fresh event within the bound is written
    monkeypatch.setattr(audit, "COMMIT_WITHIN_SECONDS", 5.0)
    batcher.submit(kms.audit.pending(action="test.after", tenant_id=None, object="n:after"))
    assert _event_count(kms) == before + 1
