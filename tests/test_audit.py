"""The audit journal: tamper evidence, one chain under concurrency, transactional with
the state it records, complete per-tenant exports, fail-closed when it cannot write."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from hsm import HsmUnavailable
from kms.clock import FixedClock
from kms.db import Database
from kms.errors import InvalidRequest, ServiceUnavailable
from kms.models import AuditEvent, Tenant, Volume
from kms.service import Kms
from tests.conftest import T0, populate


@pytest.fixture
def fresh(kms, tmp_path):  # type: ignore[no-untyped-def]
    """A Kms on the session token with its own empty database, and a movable clock."""
    clock = FixedClock(T0)
    k = Kms(db=Database(f"sqlite:///{tmp_path / 'audit.sqlite3'}"), hsm=kms.hsm, clock=clock)
    k.initialize()
    yield k, clock
    k.db.dispose()


def make_history(k: Kms) -> str:
    tid, callers, _ = populate(k, "history", volumes=2, keys=1)
    k.volumes.fetch_key(callers["hypervisor"], "vol-0")
    ct, _ = k.transit.encrypt(callers["app"], "key-0", b"x")
    k.transit.decrypt(callers["app"], "key-0", ct)
    k.lifecycle.suspend(tid)
    k.lifecycle.resume(tid)
    return tid


def _drop_anchor(k: Kms, label: str) -> None:
    """Remove the journal's anchor from the token, as the tests' token owner (bulk
    destruction refuses the service's objects)."""
    from pkcs11 import Attribute

    def op(session: Any) -> None:
        for o in list(session.get_objects({Attribute.LABEL: label})):
            o.destroy()

    k.hsm._run(op)
    k.hsm._forget_objects()


def events(k: Kms) -> list[dict[str, Any]]:
    return k.audit_export()


def test_history_verifies_and_names_actions(fresh) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    tid = make_history(k)
    result = k.audit_verify()
    assert result.ok and result.events == len(events(k)) > 10
    actions = [e["action"] for e in events(k) if e["tenant"] == tid]
    for expected in ("tenant.create", "principal.create", "volume.create", "key.create",
                     "volume.key_fetch", "key.encrypt", "key.decrypt", "tenant.suspend",
                     "tenant.resume"):
        assert expected in actions, expected
    e = events(k)[-1]
    assert e["ts"].endswith("+00:00") and len(e["ts"].split(".")[1]) == len("000000+00:00")
    assert set(e) == {"seq", "ts", "actor", "tenant", "action", "object", "outcome",
                      "request_id", "source", "prev_hash", "mac", "mac_key"}


@pytest.mark.parametrize("column,value", [
    ("ts", "2020-01-01T00:00:00.000000+00:00"), ("actor", "principal:p-evil"),
    ("tenant_id", "t-other"), ("action", "key.create"), ("object", "volume:forged"),
    ("outcome", "failure"), ("request_id", "r-forged"), ("source", "10.0.0.1"),
    ("prev_hash", "f" * 64), ("mac", "0" * 64), ("mac_key", "s-" + "0" * 32),
    ("mac_key", None),
])
def test_editing_any_field_is_detected_at_its_sequence(fresh, column, value) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    make_history(k)
    target = len(events(k)) // 2
    with k.db.write() as s:
        s.execute(text(f"UPDATE audit_events SET {column} = :v WHERE seq = :seq"),
                  {"v": value, "seq": target})
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == target, result


def test_deleting_an_event_is_detected(fresh) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    make_history(k)
    with k.db.write() as s:
        s.execute(text("DELETE FROM audit_events WHERE seq = 7"))
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == 7


def test_reordering_events_is_detected(fresh) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    make_history(k)
    with k.db.write() as s:  # swap the contents of 5 and 6, keeping their sequence numbers
        rows = {r.seq: r for r in s.scalars(select(AuditEvent).where(AuditEvent.seq.in_([5, 6])))}
        cols = ("ts", "actor", "tenant_id", "action", "object", "outcome", "request_id",
                "source", "prev_hash", "mac", "mac_key")
        a, b = ({c: getattr(rows[n], c) for c in cols} for n in (5, 6))
        for c in cols:
            setattr(rows[5], c, b[c])
            setattr(rows[6], c, a[c])
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == 5


def test_truncating_the_tail_is_detected(fresh) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    make_history(k)
    last = len(events(k))
    with k.db.write() as s:
        s.execute(text("DELETE FROM audit_events WHERE seq > :n"), {"n": last - 3})
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == last - 2 and "truncated" in result.reason


def test_cli_names_the_first_bad_sequence(fresh, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`kms audit verify` exits non-zero and names the sequence."""
    from click.testing import CliRunner

    from cli.main import main

    k, _ = fresh
    make_history(k)
    with k.db.write() as s:
        s.execute(text("UPDATE audit_events SET object = 'x' WHERE seq = 4"))
    db = tmp_path / "audit.sqlite3"
    env = {"KMS_HOME": str(settings.home), "KMS_DATABASE_URL": f"sqlite:///{db}",
           "KMS_TOKEN_SHARED_BY_DATABASES": "true"}
    r = CliRunner().invoke(main, ["audit", "verify"], env=env)
    assert r.exit_code != 0 and "sequence 4" in r.output, r.output


def test_sixteen_concurrent_writers_make_one_unbroken_chain(fresh) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    tid, callers, _ = populate(k, "busy", volumes=0, keys=1)
    before = len(events(k))
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(6):
                k.volumes.create(callers["hypervisor"], volume_id=f"w{n}-{i}",
                                 cipher="aes-xts-plain64", key_bits=512)
                k.volumes.fetch_key(callers["hypervisor"], f"w{n}-{i}")
                k.transit.encrypt(callers["app"], "key-0", b"data")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    evs = events(k)
    assert len(evs) == before + 16 * 6 * 3
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert k.audit_verify().ok


class CrashBeforeCommit(BaseException):
    pass


class FaultyDatabase:
    """The real database, whose write transactions die just before their commit."""

    def __init__(self, real: Database):
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    @contextmanager
    def write(self) -> Iterator[Any]:
        with self._real.write() as s:
            yield s
            s.flush()
            raise CrashBeforeCommit()

    @contextmanager
    def raw_write(self) -> Iterator[Any]:  # the DB-API path (volume creation, journal)
        with self._real.raw_write() as cur:
            yield cur
            raise CrashBeforeCommit()


def test_a_crash_before_commit_leaves_neither_change_nor_event(fresh) -> None:  # type: ignore[no-untyped-def]
    k, clock = fresh
    tid, callers, _ = populate(k, "crashy", volumes=1, keys=0)
    before = len(events(k))
    broken = Kms(db=FaultyDatabase(k.db), hsm=k.hsm, clock=clock)  # type: ignore[arg-type]
    with pytest.raises(CrashBeforeCommit):
        broken.volumes.create(callers["hypervisor"], volume_id="never",
                              cipher="aes-xts-plain64", key_bits=512)
    with pytest.raises(CrashBeforeCommit):
        broken.lifecycle.suspend(tid)
    with pytest.raises(CrashBeforeCommit):
        broken.volumes.delete(callers["hypervisor"], "vol-0")
    assert len(events(k)) == before
    with k.db.read() as s:
        assert s.get(Volume, (tid, "never")) is None and s.get(Volume, (tid, "vol-0"))
        assert s.get(Tenant, tid).status == "active"
    assert k.audit_verify().ok


class NoJournalHsm:
    """The real token, whose HMAC (the journal's key) is unavailable."""

    def __init__(self, real: Any):
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def hmac_sha256(self, cka_id: bytes, data: bytes) -> bytes:
        raise HsmUnavailable("the security token is unavailable")


def test_without_a_journal_destructive_operations_fail_503_and_change_nothing(fresh) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app
    from kms.config import Settings

    k, clock = fresh
    tid, callers, tokens = populate(k, "no journal", volumes=1, keys=1)
    k.lifecycle.serve_notice(tid)
    tid2, _, _ = populate(k, "no journal 2", volumes=1, keys=0)
    before = len(events(k))
    blind = Kms(db=k.db, hsm=NoJournalHsm(k.hsm), clock=clock)
    with pytest.raises(ServiceUnavailable):
        blind.lifecycle.serve_notice(tid2)
    with pytest.raises(ServiceUnavailable):
        blind.lifecycle.cancel_notice(tid)
    clock.advance(timedelta(days=21))
    outcome = blind.erasure.erase(tid)
    assert outcome.state == "erasure_failed" and outcome.error == "service_unavailable"
    with TestClient(create_app(Settings(), blind), raise_server_exceptions=False) as c:
        r = c.delete("/v1/volumes/vol-0",
                     headers={"Authorization": f"Bearer {tokens['hypervisor']}"})
        assert r.status_code == 503 and r.json()["code"] == "service_unavailable"
        assert r.headers["retry-after"]
        r = c.post("/v1/volumes/vol-0/key",
                   headers={"Authorization": f"Bearer {tokens['hypervisor']}"})
        assert r.status_code == 503, "no key is released without its journal event"
    assert k.tenants.show(tid).status == "notice" and k.tenants.show(tid2).status == "active"
    assert k.hsm.find_objects(label_prefix=f"kms/{tid}/")
    with k.db.read() as s:
        assert s.get(Volume, (tid, "vol-0")) is not None
    assert len(events(k)) == before
    assert k.erasure.erase(tid).state == "erased"  # with the journal back, it completes


def test_purge_refuses_recent_events_and_keeps_the_chain_verifiable(fresh) -> None:  # type: ignore[no-untyped-def]
    k, clock = fresh
    make_history(k)
    n_old = len(events(k))
    clock.advance(timedelta(days=200))
    make_history_2 = populate(k, "later", volumes=1, keys=0)
    assert make_history_2
    retention = timedelta(days=183)
    with pytest.raises(InvalidRequest):
        k.audit_purge(before=clock.now() - timedelta(days=10), retention=retention)
    deleted = k.audit_purge(before=clock.now() - retention, retention=retention)
    assert deleted == n_old
    result = k.audit_verify()
    assert result.ok, result
    assert events(k)[0]["seq"] == n_old + 1 and events(k)[-1]["action"] == "audit.purge"
    with k.db.write() as s:
        s.execute(text("UPDATE audit_checkpoint SET first_seq = first_seq + 1"))
    assert not k.audit_verify().ok


OPS = st.lists(st.tuples(st.sampled_from("ab"),
                         st.sampled_from(["volume", "fetch", "encrypt", "key", "suspend"])),
               max_size=25)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_tenant_export_has_all_and_only_its_events(fresh, ops) -> None:  # type: ignore[no-untyped-def]
    """Random interleavings of two tenants' operations: each tenant's export is exactly
    the events of its own operations, in order."""
    k, _ = fresh
    tenants = {}
    expected: dict[str, list[str]] = {}
    for name in "ab":
        tid, callers, _ = populate(k, f"prop {name} {len(k.tenants.list())}", volumes=1,
                                   keys=1)
        tenants[name] = (tid, callers)
        expected[tid] = [e["action"] for e in k.audit_export(tenant_id=tid)]
    counter = 0
    for who, op in ops:
        tid, c = tenants[who]
        counter += 1
        if op == "volume":
            k.volumes.create(c["hypervisor"], volume_id=f"p{counter}", cipher="aes-xts-plain64",
                             key_bits=512)
            expected[tid].append("volume.create")
        elif op == "fetch":
            k.volumes.fetch_key(c["hypervisor"], "vol-0")
            expected[tid].append("volume.key_fetch")
        elif op == "encrypt":
            k.transit.encrypt(c["app"], "key-0", b"p")
            expected[tid].append("key.encrypt")
        elif op == "key":
            k.appkeys.create(c["tenant-admin"], name=f"k{counter}", key_type="aes256-gcm")
            expected[tid].append("key.create")
        else:
            k.lifecycle.suspend(tid)
            k.lifecycle.resume(tid)
            expected[tid] += ["tenant.suspend", "tenant.resume"]
    for tid, actions in expected.items():
        export = k.audit_export(tenant_id=tid)
        assert [e["action"] for e in export] == actions
        assert all(e["tenant"] == tid for e in export)
        assert json.dumps(export).count(tid) >= len(export)


def test_replaying_an_old_head_after_truncation_is_detected(fresh) -> None:  # type: ignore[no-untyped-def]
    """The head row alone can be rolled back with the events; the token's anchor cannot."""
    k, _ = fresh
    make_history(k)
    with k.db.read() as s:
        old = s.execute(text("SELECT seq, hash, mac FROM audit_head")).one()
    make_history_more = populate(k, "more history", volumes=1, keys=0)
    assert make_history_more
    with k.db.write() as s:
        s.execute(text("DELETE FROM audit_events WHERE seq > :n"), {"n": old.seq})
        s.execute(text("UPDATE audit_head SET seq = :seq, hash = :h, mac = :m"),
                  {"seq": old.seq, "h": old.hash, "m": old.mac})
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == old.seq + 1, result


def _wipe_journal(k: Kms, *extra: str) -> None:
    """Delete every event and the head, and run any `extra` statement, in one transaction."""
    with k.db.write() as s:
        for sql in ("DELETE FROM audit_events", "DELETE FROM audit_head", *extra):
            s.execute(text(sql))


def test_deleting_the_whole_journal_is_detected(fresh) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    make_history(k)
    _wipe_journal(k)
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == 1, result


def test_every_commit_is_anchored_in_the_token_off_the_request_path(fresh) -> None:  # type: ignore[no-untyped-def]
    from kms.audit import _anchor_label
    from kms.models import AuditHead

    k, _ = fresh
    make_history(k)  # state changes and data-plane events
    assert k.audit.flush_anchor(timeout=10)
    with k.db.read() as s:
        head = s.get(AuditHead, 1)
        assert head is not None
        key = k.audit._key(s)
    from kms.audit import _anchor_mark

    assert _anchor_mark(k.hsm.read_counter(_anchor_label(key))) == (head.seq, head.hash)


def test_events_are_maced_under_a_segment_key_derived_in_the_token(fresh) -> None:  # type: ignore[no-untyped-def]
    """Every event and the head name one segment; its key is the token's HMAC of the
    segment id, and the MACs are HMAC-SHA256 under that key."""
    import hashlib
    import hmac as hmac_mod

    from kms.audit import _SEGMENT_INFO, _body, canonical
    from kms.models import AuditHead

    k, _ = fresh
    make_history(k)
    with k.db.read() as s:
        rows = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        head = s.get(AuditHead, 1)
        key = k.audit._key(s)
    segments = {r.mac_key for r in rows}
    assert len(segments) == 1 and head is not None
    [segment] = segments
    assert segment.startswith("s-") and len(segment) == 34
    derived = k.hsm.hmac_sha256(key, _SEGMENT_INFO + segment.encode())
    for r in rows:
        assert r.mac == hmac_mod.new(derived, canonical(_body(r)), hashlib.sha256).hexdigest()
    # The head is the token's own HMAC, on every commit.
    assert head.mac == k.hsm.hmac_sha256(key, f"head|{head.seq}|{head.hash}".encode()).hex()
    assert derived.hex() not in repr(k.audit._segment) and "hidden" in repr(k.audit._segment)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(k.audit._segment)


def test_a_new_segment_starts_after_its_time_and_the_chain_verifies_across(fresh) -> None:  # type: ignore[no-untyped-def]
    from kms.audit import SEGMENT_SECONDS

    k, clock = fresh
    tid = make_history(k)
    clock.advance(timedelta(seconds=SEGMENT_SECONDS + 1))
    k.lifecycle.suspend(tid)
    k.lifecycle.resume(tid)
    with k.db.read() as s:
        segments = [r.mac_key for r in s.scalars(select(AuditEvent).order_by(AuditEvent.seq))]
    assert len(set(segments)) == 2 and segments[-1] != segments[0]
    assert k.audit_verify().ok
    k.audit.forget_segment()  # e.g. a restart: a third segment
    k.lifecycle.suspend(tid)
    with k.db.read() as s:
        assert len({r.mac_key for r in s.scalars(select(AuditEvent))}) == 3
    assert k.audit_verify().ok


def test_events_from_before_segments_still_verify(fresh) -> None:  # type: ignore[no-untyped-def]
    """Rows without mac_key (schema before segments) carry an HMAC by the audit key."""
    from kms.audit import _body, canonical
    from kms.models import AuditHead

    k, _ = fresh
    tid = make_history(k)
    with k.db.write() as s:
        key = k.audit._key(s)
        # Rechain every event as a writer before segments did (token HMAC, no mac_key).
        prev = "0" * 64
        import hashlib

        for r in s.scalars(select(AuditEvent).order_by(AuditEvent.seq)):
            r.prev_hash, r.mac_key = prev, None
            raw = canonical(_body(r))
            r.mac = k.hsm.hmac_sha256(key, raw).hex()
            prev = hashlib.sha256(raw + r.mac.encode()).hexdigest()
        head = s.get(AuditHead, 1)
        head.hash = prev
        head.mac = k.hsm.hmac_sha256(key, f"head|{head.seq}|{prev}".encode()).hex()
        seq = head.seq
    # ... and its anchor, a bare sequence number (no hash).
    from kms.audit import _anchor_label

    assert k.audit.flush_anchor()
    _drop_anchor(k, _anchor_label(key))
    k.hsm.raise_counter(_anchor_label(key), seq)
    k.audit.forget_segment()
    assert k.audit_verify().ok
    k.lifecycle.suspend(tid)  # new events, in a segment, after the old ones
    assert k.audit_verify().ok
    with k.db.write() as s:
        s.execute(text("UPDATE audit_events SET object = 'forged' WHERE seq = 3"))
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == 3


def test_a_segment_key_cannot_forge_the_head(fresh) -> None:  # type: ignore[no-untyped-def]
    """Whoever read a segment key out of a process's memory can re-MAC events of that
    segment, not the head (the token's own HMAC): rewriting the last event and its head
    is still found."""
    import hashlib
    import hmac as hmac_mod

    from kms.audit import _SEGMENT_INFO, _body, _link, canonical
    from kms.models import AuditHead

    k, _ = fresh
    make_history(k)
    with k.db.write() as s:
        key = k.audit._key(s)
        last = s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
        assert last is not None and last.mac_key is not None
        leaked = k.hsm.hmac_sha256(key, _SEGMENT_INFO + last.mac_key.encode())
        last.object = "forged"
        raw = canonical(_body(last))
        last.mac = hmac_mod.new(leaked, raw, hashlib.sha256).hexdigest()
        head = s.get(AuditHead, 1)
        assert head is not None and head.seq == last.seq
        head.hash = _link(raw, last.mac)
        head.mac = hmac_mod.new(leaked, f"head|{head.seq}|{head.hash}".encode(),
                                hashlib.sha256).hexdigest()
        seq = last.seq
    # The token's anchor (sequence and hash) already tells; without it (it lags the
    # commits by up to ANCHOR_INTERVAL), the head's token HMAC does.
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == seq and "anchor" in str(result.reason)
    from kms.audit import _anchor_label

    _drop_anchor(k, _anchor_label(key))
    result = k.audit_verify()
    assert not result.ok and result.reason == "head altered" and result.first_bad_seq == seq


def _roll_back_tail(k: Kms) -> tuple[int, str]:
    """Save the head, write more, then put the database back as it was at the save: a
    database restored from a snapshot (or a tail deleted with its head restored)."""
    from kms.models import AuditHead

    tid = make_history(k)
    with k.db.read() as s:
        old = s.execute(text("SELECT seq, hash, mac FROM audit_head")).one()
    k.lifecycle.suspend(tid)
    k.lifecycle.resume(tid)
    assert k.audit.flush_anchor()
    with k.db.write() as s:
        s.execute(text("DELETE FROM audit_events WHERE seq > :n"), {"n": old.seq})
        head = s.get(AuditHead, 1)
        assert head is not None
        head.seq, head.hash, head.mac = old.seq, old.hash, old.mac
    return old.seq, tid


def test_a_rolled_back_journal_is_not_written_over_by_this_process(fresh) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    seq, tid = _roll_back_tail(k)
    with pytest.raises(ServiceUnavailable):
        k.lifecycle.suspend(tid)
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == seq + 1


def test_a_rolled_back_journal_is_not_written_over_after_a_restart(fresh) -> None:  # type: ignore[no-untyped-def]
    """A new process (a new segment) checks the token's anchor before its first event:
    writing on would reuse the lost sequence numbers and carry the anchor past them."""
    k, _ = fresh
    seq, tid = _roll_back_tail(k)
    k.audit.forget_segment()
    k.audit._committed = (0, 0)  # what a new process knows
    for _ in range(3):
        with pytest.raises(ServiceUnavailable):
            k.lifecycle.suspend(tid)
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == seq + 1


def test_the_anchor_holds_the_hash_so_a_rewritten_chain_is_found(fresh) -> None:  # type: ignore[no-untyped-def]
    """Same length, different events (rolled back, then as many events written anew
    by a writer that did not check): the anchor's hash differs at its sequence."""
    from kms.audit import _anchor_label, _anchor_mark

    k, _ = fresh
    make_history(k)
    assert k.audit.flush_anchor()
    with k.db.read() as s:
        key = k.audit._key(s)
        head_seq, head_hash = s.execute(text("SELECT seq, hash FROM audit_head")).one()
    assert _anchor_mark(k.hsm.read_counter(_anchor_label(key))) == (head_seq, head_hash)
    from kms.audit import _body, _link, canonical
    from kms.models import AuditHead

    with k.db.write() as s:  # the last event rewritten with valid MACs (as only a
        # writer holding the token could): only the anchor's hash tells
        last = s.scalars(select(AuditEvent).where(AuditEvent.seq == head_seq)).one()
        last.object, last.mac_key = "rewritten", None
        raw = canonical(_body(last))
        last.mac = k.hsm.hmac_sha256(key, raw).hex()
        head = s.get(AuditHead, 1)
        assert head is not None
        head.hash = _link(raw, last.mac)
        head.mac = k.hsm.hmac_sha256(key, f"head|{head.seq}|{head.hash}".encode()).hex()
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == head_seq
    assert result.reason == "journal rewritten (differs from the token's anchor)"


def test_purge_refuses_a_journal_that_does_not_verify(fresh) -> None:  # type: ignore[no-untyped-def]
    """An edited `ts` would let purge delete recent events; purge verifies first."""
    from kms.errors import InvalidState

    k, clock = fresh
    make_history(k)
    before = k.audit_verify().events
    with k.db.write() as s:
        s.execute(text("UPDATE audit_events SET ts = '2020-01-01T00:00:00.000000+00:00'"))
    with pytest.raises(InvalidState):
        k.audit_purge(before=T0 - timedelta(days=400), retention=timedelta(days=183))
    with k.db.read() as s:
        assert s.scalar(text("SELECT count(*) FROM audit_events")) == before


def test_a_journal_wiped_with_its_audit_key_id_changed_does_not_verify(fresh) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    make_history(k)
    _wipe_journal(k, "UPDATE service_keys SET cka_id = '00112233445566778899aabbccddeeff' "
                     "WHERE purpose = 'audit-hmac'")
    k.audit._audit_key = None  # a new process reads it from the database
    result = k.audit_verify()
    assert not result.ok and "audit key" in str(result.reason)


@pytest.mark.parametrize("column", ["object", "mac_key", "mac", "prev_hash"])
def test_a_column_of_the_wrong_type_is_an_altered_event_not_a_crash(fresh, column) -> None:  # type: ignore[no-untyped-def]
    k, _ = fresh
    make_history(k)
    with k.db.write() as s:
        s.execute(text(f"UPDATE audit_events SET {column} = CAST({column} AS BLOB) "
                       "WHERE seq = 5"))
    result = k.audit_verify()
    assert not result.ok and result.first_bad_seq == 5


def test_no_volume_key_is_released_after_its_deletion_committed(fresh) -> None:  # type: ignore[no-untyped-def]
    """The deletion commits between the unwrap and the release's journal commit: the
    release is refused (404) and the journal ends with the deletion."""
    from kms.errors import NotFound

    k, _ = fresh
    tid, callers, _ = populate(k, "release race", volumes=1, keys=0)
    hv = callers["hypervisor"]
    real = k.volumes._keyring.unwrap_with

    def unwrap_then_delete(*args: Any, **kwargs: Any) -> bytes:
        key = real(*args, **kwargs)
        k.volumes.delete(hv, "vol-0")  # another request, committed first
        return bytes(key)

    k.volumes._keyring.unwrap_with = unwrap_then_delete  # type: ignore[method-assign]
    try:
        with pytest.raises(NotFound):
            k.volumes.fetch_key(hv, "vol-0")
    finally:
        k.volumes._keyring.unwrap_with = real  # type: ignore[method-assign]
    mine = [(e["action"], e["object"]) for e in events(k) if e["tenant"] == tid]
    assert mine[-1] == ("volume.delete", "volume:vol-0")
    assert ("volume.key_fetch", "volume:vol-0") not in mine
    assert k.audit_verify().ok


def test_bulk_destruction_never_reaches_the_service_objects(fresh) -> None:  # type: ignore[no-untyped-def]
    """Tenant ids and KEK CKA_IDs come from the database: a crafted tenant id cannot make
    the service's prefix, and a KEK row naming the audit key destroys nothing."""
    from hsm import HsmDestroyUnconfirmed
    from kms.errors import KeyIntegrityError
    from kms.keyring import tenant_label_prefix

    k, _ = fresh
    tid = make_history(k)
    with k.db.read() as s:
        audit_key = k.audit._key(s)
    with pytest.raises(KeyIntegrityError):
        tenant_label_prefix("service/audit-anchor")
    for prefix in ("kms/service/", "kms/", "kms/service/audit-", ""):
        with pytest.raises(ValueError):
            k.hsm.destroy_objects(prefix)
    with pytest.raises(HsmDestroyUnconfirmed):
        k.hsm.destroy_objects(tenant_label_prefix(tid), [audit_key])
    with pytest.raises(HsmDestroyUnconfirmed):
        k.hsm.destroy(audit_key, within=tenant_label_prefix(tid))
    assert k.audit_verify().ok  # the audit key is still there, and works
    assert [o.label for o in k.hsm.find_objects(cka_id=audit_key)] == ["kms/service/audit-hmac"]


def test_purge_checks_the_journal_in_its_own_write_transaction(fresh) -> None:  # type: ignore[no-untyped-def]
    """An edit held uncommitted while purge starts, committed while purge waits for the
    write lock: purge sees it and refuses (one transaction checks and deletes)."""
    import sqlite3
    import time as _time

    from kms.errors import InvalidState

    k, _ = fresh
    make_history(k)
    n = k.audit_verify().events
    path = str(k.db.engine.url.database)
    editor = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
    editor.execute("BEGIN IMMEDIATE")
    editor.execute("UPDATE audit_events SET ts = '2000-01-01T00:00:00.000000+00:00' "
                   "WHERE seq < (SELECT max(seq) FROM audit_events)")
    threading.Timer(0.5, lambda: editor.execute("COMMIT")).start()
    started = _time.monotonic()
    with pytest.raises(InvalidState):
        k.audit_purge(before=T0 - timedelta(days=400), retention=timedelta(days=183))
    assert _time.monotonic() - started >= 0.4  # it did wait for the edit to commit
    editor.close()
    with k.db.read() as s:
        assert s.scalar(text("SELECT count(*) FROM audit_events")) == n


def test_a_forged_or_cancelled_notice_row_erases_nothing(fresh) -> None:  # type: ignore[no-untyped-def]
    """The runner checks the notice the service signed, not the row's columns."""
    from kms.models import Notice

    k, clock = fresh
    tid, _callers, _ = populate(k, "forged notice", volumes=1, keys=0)
    with k.db.write() as s:
        s.add(Notice(id="n-forged", tenant_id=tid, served_at=T0 - timedelta(days=30),
                     effective_at=T0 - timedelta(days=1), contract_end=None,
                     document=b"{}", signature=b"\x00"))
    outcome = k.erasure.erase(tid)
    assert outcome.state != "erased"
    assert k.hsm.find_objects(label_prefix=f"kms/{tid}/")  # its KEK is still there
    assert k.tenants.show(tid).status != "erased"

    # A real notice, cancelled, then its cancellation undone in the database.
    other, _c, _ = populate(k, "cancelled notice", volumes=1, keys=0)
    k.lifecycle.serve_notice(other)
    k.lifecycle.cancel_notice(other)
    with k.db.write() as s:
        s.execute(text("UPDATE notices SET cancelled_at = NULL WHERE tenant_id = :t"),
                  {"t": other})
        s.execute(text("UPDATE tenants SET status = 'notice' WHERE id = :t"), {"t": other})
    clock.advance(timedelta(days=22))
    assert k.erasure.erase(other).state != "erased"
    assert k.hsm.find_objects(label_prefix=f"kms/{other}/")


def test_kek_rotation_destroys_only_the_generation_its_row_names(fresh) -> None:  # type: ignore[no-untyped-def]
    """A retiring row that carries the active generation's CKA_ID (in upper case, past the
    UNIQUE constraint) destroys nothing."""
    k, _ = fresh
    tid, callers, _ = populate(k, "rotation guard", volumes=1, keys=0)
    with k.db.write() as s:
        active = s.execute(text("SELECT cka_id FROM keks WHERE tenant_id = :t AND "
                                "state = 'active'"), {"t": tid}).scalar_one()
        s.execute(text("INSERT INTO keks (tenant_id, generation, cka_id, label, state, "
                       "encryptions, created_at) VALUES (:t, 0, :c, :l, 'retiring', 0, "
                       "'2026-01-01 00:00:00')"),
                  {"t": tid, "c": active.upper(), "l": f"kms/{tid}/kek/0"})
    with pytest.raises(ServiceUnavailable, match="did not confirm the destruction"):
        k.kek_rotation.rotate(tid, start_new=False)
    assert k.hsm.find_objects(cka_id=bytes.fromhex(active))
    assert len(k.volumes.fetch_key(callers["hypervisor"], "vol-0").key.reveal()) == 64


def test_purge_counts_the_retention_from_the_newest_event_too(fresh) -> None:  # type: ignore[no-untyped-def]
    """A clock moved forward (faketime) does not make recent events purgeable."""
    from kms.errors import InvalidRequest

    k, clock = fresh
    make_history(k)
    n = k.audit_verify().events
    clock.advance(timedelta(days=400))
    with pytest.raises(InvalidRequest):
        k.audit_purge(before=T0 + timedelta(days=1), retention=timedelta(days=183))
    with k.db.read() as s:
        assert s.scalar(text("SELECT count(*) FROM audit_events")) == n


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(min_value=0, max_value=2**62), ts=_text, actor=_text,
       tenant=st.none() | _text, action=_text, obj=_text, outcome=_text, request_id=_text,
       source=_text, prev_hash=_text)
def test_the_writers_event_encoding_is_canonical_json_byte_for_byte(
        seq: int, ts: str, actor: str, tenant: str | None, action: str, obj: str,
        outcome: str, request_id: str, source: str, prev_hash: str) -> None:
    """What the writer MACs is exactly what verify recomputes (quotes, escapes, unicode)."""
    from kms.audit import canonical, canonical_event

    body = {"seq": seq, "ts": ts, "actor": actor, "tenant": tenant, "action": action,
            "object": obj, "outcome": outcome, "request_id": request_id, "source": source,
            "prev_hash": prev_hash}
    assert canonical_event(seq, ts, actor, tenant, action, obj, outcome, request_id, source,
                           prev_hash) == canonical(body)


def test_a_failed_raw_write_rolls_back_and_the_next_one_commits(fresh) -> None:  # type: ignore[no-untyped-def]
    """The writer's own connection leaves no open transaction behind a failure."""
    k, _ = fresh
    before = len(events(k))
    with pytest.raises(RuntimeError), k.db.raw_write() as cur:
        cur.execute("DELETE FROM audit_events")
        raise RuntimeError("crash in the middle")
    assert len(events(k)) == before
    k.audit.append_direct(k.db, [k.audit.pending(action="key.encrypt", tenant_id=None,
                                                 object="key:k:v1")])
    assert len(events(k)) == before + 1
    assert k.audit_verify().ok


def _just_before_the_event(k: Kms, change: Any) -> Any:
    """Make `change` (another request's state change, committed with its own event) run
    after the operation read its state and before its release's event is submitted."""
    batcher = k.audit_batcher
    real = batcher.submit

    def submit(event: Any) -> None:
        batcher.submit = real  # type: ignore[method-assign]
        if event.outcome == "success":
            change()
        real(event)

    batcher.submit = submit  # type: ignore[method-assign]
    return real


@pytest.mark.parametrize("change, refused", [
    ("delete_and_create_again", "NotFound"), ("suspend", "TenantSuspended"),
    ("revoke", "Unauthenticated"), ("erase", "TenantErased"),
])
def test_a_volume_key_is_not_released_past_a_change_committed_before_its_event(
        fresh, change: str, refused: str) -> None:  # type: ignore[no-untyped-def]
    """A volume deleted and created again under the same id is another volume: the old
    key never leaves; nor does any key of a tenant suspended meanwhile."""
    from kms import errors

    k, clock = fresh
    tid, callers, _ = populate(k, f"release {change}", volumes=1, keys=0)
    hv = callers["hypervisor"]
    old_key = k.volumes.fetch_key(hv, "vol-0").key.reveal()

    def do() -> None:
        if change == "suspend":
            k.lifecycle.suspend(tid)
        elif change == "revoke":
            k.principals.revoke(hv.principal_id)
        elif change == "erase":
            k.lifecycle.serve_notice(tid)
            clock.advance(timedelta(days=22))
            assert k.erasure.erase(tid).state == "erased"
        else:
            k.volumes.delete(hv, "vol-0")
            clock.advance(timedelta(seconds=1))
            k.volumes.create(hv, volume_id="vol-0", cipher="aes-xts-plain64", key_bits=512)

    real = _just_before_the_event(k, do)
    try:
        with pytest.raises(getattr(errors, refused)):
            k.volumes.fetch_key(hv, "vol-0")
    finally:
        k.audit_batcher.submit = real  # type: ignore[method-assign]
    fetches = [e for e in events(k) if e["tenant"] == tid and e["action"] == "volume.key_fetch"]
    assert len(fetches) == 1, "only the first, undisturbed fetch is journaled"
    if change == "delete_and_create_again":
        assert k.volumes.fetch_key(hv, "vol-0").key.reveal() != old_key
    assert k.audit_verify().ok


def test_a_kek_rotation_between_the_read_and_the_event_does_not_refuse_the_release(
        fresh) -> None:  # type: ignore[no-untyped-def]
    """The rotation rewraps the same key under a new generation: the release goes on."""
    k, _ = fresh
    tid, callers, _ = populate(k, "release during kek rotation", volumes=1, keys=0)
    hv = callers["hypervisor"]
    key = k.volumes.fetch_key(hv, "vol-0").key.reveal()
    real = _just_before_the_event(k, lambda: k.kek_rotation.rotate(tid))
    try:
        assert k.volumes.fetch_key(hv, "vol-0").key.reveal() == key
    finally:
        k.audit_batcher.submit = real  # type: ignore[method-assign]
    assert k.audit_verify().ok


@pytest.mark.parametrize("op", ["encrypt", "decrypt", "rewrap", "datakey"])
@pytest.mark.parametrize("change, refused", [
    ("suspend", "TenantSuspended"), ("disable", "KeyDisabled"),
    ("destroy_version", "KeyVersionUnavailable"), ("revoke", "Unauthenticated"),
    ("erase", "TenantErased"),
])
def test_no_transit_result_leaves_past_a_change_committed_before_its_event(
        fresh, op: str, change: str, refused: str) -> None:  # type: ignore[no-untyped-def]
    """Plaintext, ciphertext or a data key is not answered once the tenant, the key or the
    version it used changed state in a commit that came before its event."""
    from kms import errors

    k, clock = fresh
    tid, callers, _ = populate(k, f"transit {op} {change}", volumes=0, keys=1)
    app, admin = callers["app"], callers["tenant-admin"]
    ciphertext, _ = k.transit.encrypt(app, "key-0", b"secret")

    def do() -> None:
        if change == "suspend":
            k.lifecycle.suspend(tid)
        elif change == "disable":
            k.appkeys.update(admin, "key-0", enabled=False)
        elif change == "revoke":
            k.principals.revoke(app.principal_id)
        elif change == "erase":  # the key's rows are gone: the tenant's state answers
            k.lifecycle.serve_notice(tid)
            clock.advance(timedelta(days=22))
            assert k.erasure.erase(tid).state == "erased"
        else:  # the only version: rotate first, so that version 1 may be destroyed
            k.appkeys.rotate(admin, "key-0")
            k.appkeys.set_version_state(admin, "key-0", 1, "destroyed")

    calls = {"encrypt": lambda: k.transit.encrypt(app, "key-0", b"x"),
             "decrypt": lambda: k.transit.decrypt(app, "key-0", ciphertext),
             "rewrap": lambda: k.transit.rewrap(app, "key-0", ciphertext),
             "datakey": lambda: k.transit.datakey(app, "key-0", bits=256)}
    before = len([e for e in events(k) if e["tenant"] == tid and e["outcome"] == "success"
                  and e["action"] == f"key.{op}"])
    real = _just_before_the_event(k, do)
    try:
        with pytest.raises(getattr(errors, refused)):
            calls[op]()
    finally:
        k.audit_batcher.submit = real  # type: ignore[method-assign]
    after = len([e for e in events(k) if e["tenant"] == tid and e["outcome"] == "success"
                 and e["action"] == f"key.{op}"])
    assert after == before
    assert k.audit_verify().ok


@pytest.mark.parametrize("bad", ["malformed", "above_latest", "suspended_version",
                                 "tampered"])
def test_every_refused_rewrap_of_an_existing_key_is_journaled(fresh, bad: str) -> None:  # type: ignore[no-untyped-def]
    """As decrypt's are: one failure event, whatever made the rewrap fail."""
    from kms.errors import DecryptionFailed, KeyVersionUnavailable

    k, _ = fresh
    tid, callers, _ = populate(k, f"rewrap {bad}", volumes=0, keys=1)
    app, admin = callers["app"], callers["tenant-admin"]
    ciphertext, _ = k.transit.encrypt(app, "key-0", b"secret")
    if bad == "malformed":
        ciphertext = "kms:v1:not*base64"
    elif bad == "above_latest":
        ciphertext = ciphertext.replace("kms:v1:", "kms:v9:")
    elif bad == "tampered":
        ciphertext = ciphertext[:-2] + ("AA" if ciphertext[-2:] != "AA" else "BB")
    else:
        k.appkeys.rotate(admin, "key-0")
        k.appkeys.set_version_state(admin, "key-0", 1, "suspended")

    def failures() -> int:
        return len([e for e in events(k) if e["tenant"] == tid and e["action"] == "key.rewrap"
                    and e["outcome"] == "failure"])

    before = failures()
    with pytest.raises((DecryptionFailed, KeyVersionUnavailable)):
        k.transit.rewrap(app, "key-0", ciphertext)
    assert failures() == before + 1
