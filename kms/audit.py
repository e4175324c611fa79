"""The audit journal (SecNumCloud 12.6-12.8): append-only, chained, HMAC'd in the token.

Each event's body is canonical JSON of {seq, ts, actor, tenant, action, object, outcome,
request_id, source, prev_hash}; `prev_hash` = SHA-256(previous body || previous mac),
`mac` = HMAC-SHA256 of the body under the key of the event's journal segment. A head row
(seq and hash of the last event) is updated in the same transaction, so that truncating
the tail is detected too; it is HMAC'd by the token's audit key itself, on every commit:
a leaked segment key cannot forge a head, and every journaled operation, data plane
included, needs the token to be there (an unplugged token answers 503, as the rest of
the service does). A checkpoint row anchors the chain after a purge (HMAC'd by the
audit key itself, too).

Segments: a writer derives its MAC key in the token, as HMAC-SHA256(audit key,
"kms/audit-segment/v1|" + segment id), for a fresh random segment id, and uses it for at
most SEGMENT_EVENTS events or SEGMENT_SECONDS; each row names its segment (`mac_key`).
The derived key never leaves the process's memory and is never stored: only the token
can derive it again (`verify` does, once a segment). An HMAC in the token costs a
SoftHSM round trip (18-34 us, more than the rest of an event); in process it costs 2 us:
one token HMAC per commit (the head) instead of one per event and one per commit.
Rows without `mac_key` (written before segments) carry an HMAC by the audit key itself
and verify as such.

State changes record their event inside their own transaction (`record`): no change
without its event, no event without its change. Data-plane events (key fetch, encrypt,
decrypt, data keys) go through a group commit (`AuditBatcher`): the caller waits until
the batch holding its event has committed, so no event is lost and the cost of one
transaction is shared by every request that arrived meanwhile.
"""

from __future__ import annotations

import atexit
import contextvars
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from json.encoder import encode_basestring as _json_str
from typing import Any, NamedTuple

from sqlalchemy import delete, event, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from hsm import HsmError, Pkcs11Hsm
from kms.clock import Clock
from kms.db import Database, rowcount
from kms.errors import KeyIntegrityError, KmsError, ServiceUnavailable
from kms.models import AuditCheckpoint, AuditEvent, AuditHead, service_key_id

GENESIS = "0" * 64
_HEAD = select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1).with_for_update()
_HEAD_SQL = "SELECT seq, hash FROM audit_head WHERE id = 1"
_EVENT_COLUMNS = ("seq", "ts", "actor", "tenant_id", "action", "object", "outcome",
                  "request_id", "source", "prev_hash", "mac", "mac_key")
_INSERT_SQL = (f"INSERT INTO audit_events ({', '.join(_EVENT_COLUMNS)}) "
               f"VALUES ({', '.join('?' for _ in _EVENT_COLUMNS)})")


@dataclass(frozen=True)
class _Head:
    seq: int
    hash: str
ANCHOR_INTERVAL = 0.2
# A data-plane event not committed within this many seconds of its creation is dropped
# under the journal's lock: its caller stops waiting a second later (the group commit's
# WAIT_SECONDS) with a 503, so no event records a release that did not happen.
COMMIT_WITHIN_SECONDS = 9.0
SEGMENT_EVENTS = 1_000_000
SEGMENT_SECONDS = 3600.0
_SEGMENT_INFO = b"kms/audit-segment/v1|"
log = logging.getLogger("kms.audit")


class _Segment:
    """A journal segment's id and MAC key (derived in the token; never printed)."""

    __slots__ = ("_key", "born", "events", "id", "pid")

    def __init__(self, segment_id: str, key: bytes, *, born: datetime):
        self.id, self._key, self.born = segment_id, key, born
        self.pid, self.events = os.getpid(), 0

    def mac(self, data: bytes) -> str:
        return hmac.digest(self._key, data, "sha256").hex()

    def __repr__(self) -> str:
        return f"_Segment({self.id!r}, <key hidden>)"

    def __reduce__(self) -> Any:
        raise TypeError("key material cannot be pickled")


def _derive_segment_key(hsm: Pkcs11Hsm, audit_key: bytes, segment_id: str) -> bytes:
    return hsm.hmac_sha256(audit_key, _SEGMENT_INFO + segment_id.encode())


AUDIT_KEY_LABEL = "kms/service/audit-hmac"


def _anchor_label(audit_key: bytes) -> str:
    return f"kms/service/audit-anchor/{audit_key.hex()}"


Mark = tuple[int, str]  # a committed head: (sequence, link hash of that event)
_HASH_BITS = 256


def _anchor_value(mark: Mark) -> int:
    """The anchor counter's value: the sequence above the link hash, so that the
    counter's order is the sequence's and the token keeps the hash of the chain at it."""
    seq, link = mark
    return (seq << _HASH_BITS) | int(link, 16)


def _anchor_mark(value: int) -> tuple[int, str | None]:
    """(sequence, hash) of a counter value; anchors written before hashes: (value, None)."""
    if value >> _HASH_BITS == 0:
        return value, None
    return value >> _HASH_BITS, f"{value & ((1 << _HASH_BITS) - 1):064x}"


@dataclass
class AuditContext:
    """Who is acting, for which request, from where. Mutable: the API's auth dependency
    fills `actor` in after the middleware created the context."""

    request_id: str = field(default_factory=lambda: f"r-{os.urandom(8).hex()}")
    source: str = "local"
    actor: str = "system"


_context: contextvars.ContextVar[AuditContext | None] = contextvars.ContextVar(
    "kms_audit_context", default=None)


def current_context() -> AuditContext:
    ctx = _context.get()
    return ctx if ctx is not None else AuditContext()


@contextmanager
def audit_context(ctx: AuditContext) -> Iterator[AuditContext]:
    token = enter_audit_context(ctx)
    try:
        yield ctx
    finally:
        leave_audit_context(token)


def enter_audit_context(ctx: AuditContext) -> contextvars.Token[AuditContext | None]:
    """`audit_context` without a context manager (the API's middleware, every request)."""
    return _context.set(ctx)


def leave_audit_context(token: contextvars.Token[AuditContext | None]) -> None:
    _context.reset(token)


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes an event's MAC covers: JSON, keys sorted, no spaces, UTF-8."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_event(seq: int, ts: str, actor: str, tenant: str | None, action: str,
                    object: str, outcome: str, request_id: str, source: str,
                    prev_hash: str) -> bytes:
    """`canonical` of an event body, byte for byte, written out for the journal's writer
    (json.dumps with sort_keys was a fifth of a commit's CPU): the keys in sorted order,
    each string through the encoder json.dumps itself uses with ensure_ascii=False.
    Only for values of the columns' types; `verify` uses `canonical`, which takes anything
    a tampered row holds."""
    t = "null" if tenant is None else _json_str(tenant)
    return (f'{{"action":{_json_str(action)},"actor":{_json_str(actor)},'
            f'"object":{_json_str(object)},"outcome":{_json_str(outcome)},'
            f'"prev_hash":{_json_str(prev_hash)},"request_id":{_json_str(request_id)},'
            f'"seq":{int(seq)},"source":{_json_str(source)},"tenant":{t},'
            f'"ts":{_json_str(ts)}}}').encode()


def _body(e: AuditEvent) -> dict[str, Any]:
    return {"seq": e.seq, "ts": e.ts, "actor": e.actor, "tenant": e.tenant_id,
            "action": e.action, "object": e.object, "outcome": e.outcome,
            "request_id": e.request_id, "source": e.source, "prev_hash": e.prev_hash}


def _link(body: bytes, mac: str) -> str:
    return hashlib.sha256(body + mac.encode()).hexdigest()


class Requirement(NamedTuple):
    """What must still hold when a release's event is committed, read under the journal's
    lock (so after every state change whose own event came before): `sql` with `params`
    returns at most one row, and `check(row)` raises the KmsError the caller then gets
    instead of its answer (the event is not written), or returns."""

    sql: str
    params: tuple[Any, ...]
    check: Callable[[tuple[Any, ...] | None], None]


class PendingEvent(NamedTuple):
    """One data-plane event waiting for its commit (a named tuple: one per request)."""

    action: str
    tenant_id: str | None
    object: str
    outcome: str
    actor: str
    request_id: str
    source: str
    # What must still hold when the event is committed; otherwise the event is not
    # written and its waiter gets the error `requires.check` raised.
    requires: Requirement | None = None
    # time.monotonic() after which the event is not written: its caller has been
    # answered 503 by then, and the journal must not record what never reached it.
    not_after: float = math.inf


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    reason: str | None = None


class _Anchorer:
    """Writes the journal's head sequence to the token off the request path.

    The anchor is a monotonic counter in the token: a database restored from an old
    backup, or a truncated journal, ends below it and `verify` says so. Writing it costs
    a token search and an object write (milliseconds, more in a token holding thousands
    of objects), so one background thread writes the highest committed sequence, at most
    every ANCHOR_INTERVAL seconds (or ten times the last write's duration, whichever is
    longer); `flush` waits for it (verify, exit)."""

    def __init__(self, hsm: Pkcs11Hsm):
        self._hsm = hsm
        self._cond = threading.Condition()
        self._label = ""
        self._target = self._written = 0
        self._target_hash = ""
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._idle = False
        self._flushing = 0

    def request(self, label: str, mark: Mark) -> None:
        seq = mark[0]
        with self._cond:
            if self._pid != os.getpid():  # forked: the parent's thread is not ours
                self._thread, self._target, self._written = None, 0, 0
                self._pid = os.getpid()
            if seq <= self._target and label == self._label:
                return
            self._label, self._target, self._target_hash = label, seq, mark[1]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-anchor",
                                                daemon=True)
                self._thread.start()
                atexit.register(self.flush, 10.0)
            if self._idle:  # resting threads pick the new target up when they wake
                self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            try:
                while self._written < self._target and self._pid == os.getpid() \
                        and self._thread is not None and self._thread.is_alive():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.notify_all()
                    self._cond.wait(remaining)
                return self._written >= self._target
            finally:
                self._flushing -= 1

    def _run(self) -> None:
        while True:
            with self._cond:
                self._idle = True
                while self._written >= self._target:
                    self._cond.wait()
                self._idle = False
                label, target, link = self._label, self._target, self._target_hash
            started = time.monotonic()
            try:
                self._hsm.raise_counter(label, _anchor_value((target, link)))
                ok = True
            except HsmError:
                # The events are committed; the anchor lags until the next attempt.
                log.warning("audit anchor not written", extra={"seq": target})
                ok = False
            with self._cond:
                if ok:
                    self._written = max(self._written, target)
                    self._cond.notify_all()
                # Rest, so that the next write covers every commit in between; a flush
                # cuts the rest short.
                # In a token holding many objects a write takes longer (SoftHSM's file
                # store): rest ten times as long, so the token stays free 90% of the time.
                took = time.monotonic() - started
                rest_until = time.monotonic() + max(ANCHOR_INTERVAL, 10 * took)
                # A failed write rests even during a flush: retrying at once against an
                # absent token would only fill the log until the flush gives up.
                while (not self._flushing or not ok) and time.monotonic() < rest_until:
                    self._cond.wait(rest_until - time.monotonic())


_AUDIT_OBJECTS = "kms/service/audit-"  # the audit key and its anchors


class AuditJournal:
    def __init__(self, *, hsm: Pkcs11Hsm, clock: Clock, exclusive_token: bool = False):
        self._hsm, self._clock = hsm, clock
        self._exclusive = exclusive_token
        self._anchorer = _Anchorer(hsm)
        self._audit_key: bytes | None = None
        self._segment: _Segment | None = None
        self._segment_lock = threading.Lock()
        self._committed = (0, 0)  # (pid, highest sequence this process committed)

    # -- writing ------------------------------------------------------------------------

    def pending(self, *, action: str, tenant_id: str | None, object: str = "",
                outcome: str = "success", actor: str | None = None,
                requires: Requirement | None = None) -> PendingEvent:
        ctx = current_context()
        return PendingEvent(action, tenant_id, object, outcome, actor or ctx.actor,
                            ctx.request_id, ctx.source, requires,
                            time.monotonic() + COMMIT_WITHIN_SECONDS)

    def record(self, s: Session, *, action: str, tenant_id: str | None, object: str = "",
               outcome: str = "success", actor: str | None = None) -> None:
        """Append one event inside the caller's write transaction.

        Raises ServiceUnavailable if the journal cannot be written (the caller's whole
        transaction then rolls back: no change without its event)."""
        self.append(s, [self.pending(action=action, tenant_id=tenant_id, object=object,
                                     outcome=outcome, actor=actor)], anchor_now=True)

    def append(self, s: Session, events: list[PendingEvent], *,
               anchor_now: bool = False) -> None:
        """Append in the caller's transaction. Once it commits, the new head sequence is
        anchored in the token (a monotonic counter a database restore cannot roll back):
        always for state changes, at most once a second for data-plane batches."""
        try:
            key = self._key(s)
            head = s.execute(_HEAD).first()
            rows, seq, prev, head_mac = self._chain(key, head, events, lambda n: s.scalar(
                select(AuditEvent.prev_hash).where(AuditEvent.seq == n)))
            # Core statements: one executemany for the batch, no ORM unit of work.
            s.execute(insert(AuditEvent), [dict(zip(_EVENT_COLUMNS, r, strict=True))
                                           for r in rows])
            if head is None:
                s.execute(insert(AuditHead).values(id=1, seq=seq, hash=prev, mac=head_mac))
            else:
                s.execute(update(AuditHead).where(AuditHead.id == 1)
                          .values(seq=seq, hash=prev, mac=head_mac))
            event.listen(s, "after_commit", lambda _s: self.anchor((seq, prev)), once=True)
        except (SQLAlchemyError, HsmError, KeyIntegrityError) as exc:
            raise ServiceUnavailable("the audit journal cannot be written") from exc

    def append_direct(self, db: Database, events: list[PendingEvent]
                      ) -> list[KmsError | None]:
        """`append` in a transaction of its own, in plain DB-API (the group commit of the
        data plane: four statements a batch instead of SQLAlchemy's unit of work).
        Returns, for each event, None when it was written, or the error of its
        `requires` once the journal is locked: that event is left out (its release must
        not happen)."""
        with db.raw_write() as cur:
            mark, refused = self._append(cur, db, events)
        if mark is not None:
            self.anchor(mark)
        return refused

    def append_cursor(self, cur: Any, db: Database, events: list[PendingEvent]) -> Mark:
        """Append inside the caller's `db.raw_write()` transaction; returns the new head,
        which the caller passes to `anchor` once the transaction committed."""
        mark, refused = self._append(cur, db, events)
        assert mark is not None and not any(refused)
        return mark

    def _append(self, cur: Any, db: Database, events: list[PendingEvent]
                ) -> tuple[Mark | None, list[KmsError | None]]:
        try:
            if self._audit_key is None:
                with db.read() as s:
                    self._key(s)
            key = self._audit_key
            assert key is not None
            # The row lock serializes replicas on PostgreSQL (SQLite: BEGIN IMMEDIATE).
            cur.execute(db.sql(_HEAD_SQL) + ("" if db.is_sqlite else " FOR UPDATE"))
            found = cur.fetchone()
            head = _Head(*found) if found is not None else None
            # Checked under the journal's lock: a deletion that committed its own event
            # before this batch took the lock is seen here (PostgreSQL: read committed).
            refused: list[KmsError | None] = []
            asked_rows: dict[tuple[str, tuple[Any, ...]], tuple[Any, ...] | None] = {}
            now = time.monotonic()
            for e in events:
                refused.append(None)
                if now > e.not_after:  # its caller has had (or is about to have) a 503
                    refused[-1] = ServiceUnavailable("the audit journal cannot be written")
                elif e.requires is not None:
                    # Requests for the same key or volume ask the same: read it once.
                    asked = (e.requires.sql, e.requires.params)
                    if asked not in asked_rows:
                        cur.execute(db.sql(asked[0]), asked[1])
                        row = cur.fetchone()
                        asked_rows[asked] = None if row is None else tuple(row)
                    try:
                        e.requires.check(asked_rows[asked])
                    except KmsError as exc:
                        refused[-1] = exc
            events = [e for e, r in zip(events, refused, strict=True) if r is None]
            if not events:
                return None, refused

            def link_at(n: int) -> str | None:
                cur.execute(db.sql("SELECT prev_hash FROM audit_events WHERE seq = ?"), (n,))
                got = cur.fetchone()
                return None if got is None else str(got[0])

            rows, seq, prev, head_mac = self._chain(key, head, events, link_at)
            cur.executemany(db.sql(_INSERT_SQL), rows)
            if head is None:
                cur.execute(db.sql("INSERT INTO audit_head (id, seq, hash, mac) "
                                   "VALUES (1, ?, ?, ?)"), (seq, prev, head_mac))
            else:
                cur.execute(db.sql("UPDATE audit_head SET seq = ?, hash = ?, mac = ? "
                                   "WHERE id = 1"), (seq, prev, head_mac))
            return (seq, prev), refused
        except (HsmError, KeyIntegrityError) as exc:
            raise ServiceUnavailable("the audit journal cannot be written") from exc

    def anchor(self, mark: Mark) -> None:
        """Have this committed head anchored in the token, soon (`_Anchorer`)."""
        assert self._audit_key is not None
        with self._segment_lock:
            pid, committed = self._committed
            self._committed = (os.getpid(), max(mark[0], committed if pid == os.getpid()
                                                else 0))
        self._anchorer.request(_anchor_label(self._audit_key), mark)

    def _chain(self, key: bytes, head: Any, events: list[PendingEvent],
               link_at: Callable[[int], str | None]
               ) -> tuple[list[tuple[Any, ...]], int, str, str]:
        """The rows of `events` (tuples in `_EVENT_COLUMNS` order) chained after `head`;
        returns them with the new head's seq, hash and mac (by the token). Every event of
        one commit carries the same time. Refuses to extend a journal that is behind what
        this process committed, or, when a segment starts, behind the token's anchor:
        appending there would write over the evidence of a rollback."""
        seq, prev = (head.seq, head.hash) if head is not None else (0, GENESIS)
        pid, committed = self._committed
        if pid == os.getpid() and seq < committed:
            raise KeyIntegrityError("the journal is behind what this process committed")
        segment = self._writing_segment(key, len(events), seq, prev, link_at)
        ts = self._clock.now().isoformat(timespec="microseconds")
        rows = []
        for p in events:
            seq += 1
            raw = canonical_event(seq, ts, p.actor, p.tenant_id, p.action, p.object,
                                  p.outcome, p.request_id, p.source, prev)
            mac = segment.mac(raw)
            rows.append((seq, ts, p.actor, p.tenant_id, p.action, p.object, p.outcome,
                         p.request_id, p.source, prev, mac, segment.id))
            prev = _link(raw, mac)
        head_mac = self._hsm.hmac_sha256(key, f"head|{seq}|{prev}".encode()).hex()
        return rows, seq, prev, head_mac

    def _writing_segment(self, key: bytes, n: int, head_seq: int, head_hash: str,
                         link_at: Callable[[int], str | None]) -> _Segment:
        """The segment that MACs the next `n` events: a new one (its key derived in the
        token) after SEGMENT_EVENTS events, SEGMENT_SECONDS, or a fork."""
        with self._segment_lock:
            seg, now = self._segment, self._clock.now()
            if seg is None or seg.pid != os.getpid() or seg.events + n > SEGMENT_EVENTS \
                    or not (0 <= (now - seg.born).total_seconds() < SEGMENT_SECONDS):
                self._check_anchor(key, head_seq, head_hash, link_at)
                segment_id = f"s-{secrets.token_hex(16)}"
                seg = _Segment(segment_id, _derive_segment_key(self._hsm, key, segment_id),
                               born=now)
                self._segment = seg
            seg.events += n
            return seg

    def _check_anchor(self, key: bytes, head_seq: int, head_hash: str,
                      link_at: Callable[[int], str | None]) -> None:
        anchored, link = self.read_anchor(key)
        if head_seq < anchored:
            log.error("audit journal refuses to append: the database is behind the token's "
                      "anchor (rolled back or truncated); run kms audit verify")
            raise KeyIntegrityError("the journal is behind the token's anchor")
        if link is not None and anchored > 0:
            found = head_hash if anchored == head_seq else link_at(anchored + 1)
            if found is None or not hmac.compare_digest(found, link):
                log.error("audit journal refuses to append: the database differs from the "
                          "token's anchor (rewritten); run kms audit verify")
                raise KeyIntegrityError("the journal differs from the token's anchor")

    def read_anchor(self, key: bytes) -> tuple[int, str | None]:
        """The token's anchor for this journal: (sequence, link hash or None)."""
        return _anchor_mark(self._hsm.read_counter(_anchor_label(key)))

    def anchor_before_snapshot(self, db: Database) -> tuple[int, str | None]:
        """The anchor to hand to `verify`, read before the caller opens its snapshot:
        the anchor only ever follows commits, so a snapshot taken after holds every
        event it covers."""
        self.flush_anchor()
        with db.read() as s:
            key = self._key(s)
        return self.read_anchor(key)

    def forget_segment(self) -> None:
        """Drop the segment key from memory; the next event starts a new segment."""
        with self._segment_lock:
            self._segment = None

    def flush_anchor(self, timeout: float = 10.0) -> bool:
        """Wait until every sequence this process committed is anchored in the token."""
        return self._anchorer.flush(timeout)

    def _key(self, s: Session) -> bytes:
        # The audit key's CKA_ID never changes for a database: read it once.
        if self._audit_key is None:
            self._audit_key = service_key_id(s, "audit-hmac")
        return self._audit_key

    # -- reading ------------------------------------------------------------------------

    def _other_journals(self, key: bytes | None) -> int:
        """Audit keys and anchors in the token that are not this journal's."""
        mine = {AUDIT_KEY_LABEL, _anchor_label(key)} if key is not None else set()
        return sum(1 for o in self._hsm.find_objects(label_prefix=_AUDIT_OBJECTS)
                   if not (o.label in mine and (o.label != AUDIT_KEY_LABEL or o.cka_id == key)))

    def refuse_second_journal(self) -> None:
        """`kms init` on a database without an audit key: refused when the token (one
        journal per token) already holds one, or an anchor. The database that goes with
        them lost its journal or is not the one made with this token; a new journal
        would hide that."""
        if self._exclusive and self._other_journals(None):
            raise KeyIntegrityError("the token already holds an audit journal's key: this "
                                    "database is not the one made with this token (restore "
                                    "it, or use a new token)")

    def verify(self, s: Session, anchor: tuple[int, str | None] | None = None
               ) -> VerifyResult:
        """Check that the audit key is the token's, every event's HMAC, the chain, the
        sequence, the head, and the token's anchor (sequence and hash). `anchor` is the
        anchor read before the snapshot `s` began: read after it, under load, the anchor
        may already cover events the snapshot does not hold (a false alarm)."""
        self.flush_anchor()
        key = self._key(s)
        if not any(o.label == AUDIT_KEY_LABEL and o.object_class == "SECRET_KEY"
                   for o in self._hsm.find_objects(cka_id=key)):
            return VerifyResult(False, 0, 1, "the audit key named in the database is not "
                                "the token's")
        if self._exclusive and self._other_journals(key):
            return VerifyResult(False, 0, 1, "the token holds another journal's audit key or "
                                "anchor (this database's journal was replaced)")
        anchored, anchored_link = anchor if anchor is not None else self.read_anchor(key)
        cp = s.get(AuditCheckpoint, 1)
        expected_seq = (cp.first_seq if cp else 1)
        prev = cp.prev_hash if cp else GENESIS
        if cp is not None and not self._mac_ok(key, f"checkpoint|{cp.first_seq}|{cp.prev_hash}",
                                               cp.mac):
            return VerifyResult(False, 0, cp.first_seq, "checkpoint altered")
        count = 0
        segments: dict[str, _Segment] = {}
        for row in s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).yield_per(1000):
            try:
                if row.seq != expected_seq:
                    return VerifyResult(False, count, min(int(row.seq), expected_seq),
                                        "sequence gap")
                body = canonical(_body(row))
                if not self._mac_ok(key, body, row.mac, row.mac_key, segments):
                    return VerifyResult(False, count, row.seq, "event altered")
                if row.prev_hash != prev:
                    return VerifyResult(False, count, row.seq, "chain broken")
                prev = _link(body, row.mac)
            except (TypeError, ValueError, AttributeError):  # a column of the wrong type
                return VerifyResult(False, count, expected_seq, "event altered")
            if row.seq == anchored and anchored_link is not None \
                    and not hmac.compare_digest(prev, anchored_link):
                return VerifyResult(False, count, row.seq,
                                    "journal rewritten (differs from the token's anchor)")
            expected_seq += 1
            count += 1
        head = s.get(AuditHead, 1)
        last = expected_seq - 1
        if head is None:
            if count == 0 and anchored == 0:
                return VerifyResult(True, 0)
            return VerifyResult(False, count, last + 1, "journal truncated (head missing)")
        if head.seq < anchored:
            return VerifyResult(False, count, head.seq + 1,
                                "journal truncated (behind the token's anchor)")
        try:
            head_ok = self._mac_ok(key, f"head|{head.seq}|{head.hash}", head.mac)
        except (TypeError, ValueError, AttributeError):
            head_ok = False
        if not head_ok:
            return VerifyResult(False, count, last, "head altered")
        if head.seq != last or head.hash != prev:
            return VerifyResult(False, count, min(head.seq, last) + 1, "journal truncated")
        return VerifyResult(True, count)

    def _mac_ok(self, key: bytes, data: bytes | str, mac: str, mac_key: str | None = None,
                segments: dict[str, _Segment] | None = None) -> bool:
        """`mac` checked in constant time: under the segment `mac_key` names (its key
        derived again in the token, once per segment), or by the audit key itself."""
        raw = data.encode() if isinstance(data, str) else data
        if mac_key is None:
            expected = self._hsm.hmac_sha256(key, raw).hex()
        else:
            cache = segments if segments is not None else {}
            seg = cache.get(mac_key)
            if seg is None:
                seg = cache[mac_key] = _Segment(
                    mac_key, _derive_segment_key(self._hsm, key, mac_key), born=self._clock.now())
            expected = seg.mac(raw)
        return hmac.compare_digest(expected, mac or "")

    @staticmethod
    def export(s: Session, *, tenant_id: str | None = None,
               since: datetime | None = None) -> Iterator[dict[str, Any]]:
        q = select(AuditEvent).order_by(AuditEvent.seq)
        if tenant_id is not None:
            q = q.where(AuditEvent.tenant_id == tenant_id)
        if since is not None:
            q = q.where(AuditEvent.ts >= since.isoformat(timespec="microseconds"))
        for row in s.scalars(q).yield_per(1000):
            yield {**_body(row), "mac": row.mac, "mac_key": row.mac_key}

    def purge(self, s: Session, *, before: datetime) -> int:
        """Delete events older than `before` and anchor the chain at the first kept one."""
        cutoff = before.isoformat(timespec="microseconds")
        first_kept = s.scalars(select(AuditEvent).where(AuditEvent.ts >= cutoff)
                               .order_by(AuditEvent.seq).limit(1)).first()
        head = s.get(AuditHead, 1)
        if first_kept is None and head is None:
            return 0
        anchor_seq = first_kept.seq if first_kept else (head.seq + 1 if head else 1)
        anchor_prev = first_kept.prev_hash if first_kept else (head.hash if head else GENESIS)
        n = rowcount(s.execute(delete(AuditEvent).where(AuditEvent.seq < anchor_seq)))
        key = self._key(s)
        cp = s.get(AuditCheckpoint, 1) or AuditCheckpoint(id=1)
        cp.first_seq, cp.prev_hash = anchor_seq, anchor_prev
        cp.mac = self._hsm.hmac_sha256(key, f"checkpoint|{anchor_seq}|{anchor_prev}".encode()).hex()
        cp.purged_before = cutoff
        s.merge(cp)
        return n

    @staticmethod
    def newest_time(s: Session) -> datetime | None:
        """The time of the last event (the journal's own clock), or None when empty."""
        ts = s.scalar(select(AuditEvent.ts).order_by(AuditEvent.seq.desc()).limit(1))
        try:
            return datetime.fromisoformat(str(ts)) if ts is not None else None
        except ValueError:
            return None

    @staticmethod
    def count(s: Session) -> int:
        return int(s.scalar(select(func.count()).select_from(AuditEvent)) or 0)
