"""A state machine over offboard / cancel / suspend / resume / erasure runs / arbitrary
clock moves: never erased before 21×24 h after the notice, always erased by the first
run once due, never out of `erased`."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kms.errors import InvalidState

NOTICE = timedelta(days=21)
_names = itertools.count()


@pytest.fixture
def machine_kms(clocked):  # type: ignore[no-untyped-def]
    return clocked


def test_lifecycle_state_machine(machine_kms) -> None:  # type: ignore[no-untyped-def]
    kms, clock = machine_kms

    class Lifecycle(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.tid = kms.tenants.create(f"machine {next(_names)}").id
            self.status = "active"
            self.served_at = None  # pending notice, as the model sees it
            self.effective_at = None

        def _actual(self) -> str:
            return kms.tenants.show(self.tid).status

        @rule()
        def offboard(self) -> None:
            try:
                n = kms.lifecycle.serve_notice(self.tid)
            except InvalidState:
                assert self.status in ("notice", "erased") or self.served_at is not None
                return
            assert self.served_at is None and self.status in ("active", "suspended")
            self.served_at, self.effective_at = n.served_at, n.effective_at
            assert n.effective_at - n.served_at >= NOTICE
            self.status = "notice" if self.status == "active" else "suspended"

        @rule()
        def cancel(self) -> None:
            try:
                kms.lifecycle.cancel_notice(self.tid)
            except InvalidState:
                assert self.served_at is None or self.status == "erased"
                return
            assert self.served_at is not None
            self.served_at = self.effective_at = None
            if self.status == "notice":
                self.status = "active"

        @rule()
        def suspend(self) -> None:
            try:
                kms.lifecycle.suspend(self.tid)
            except InvalidState:
                assert self.status not in ("active", "notice")
                return
            self.status = "suspended"

        @rule()
        def resume(self) -> None:
            try:
                kms.lifecycle.resume(self.tid)
            except InvalidState:
                assert self.status != "suspended"
                return
            self.status = "notice" if self.served_at is not None else "active"

        @rule(seconds=st.integers(min_value=0, max_value=30 * 86400))
        def advance(self, seconds: int) -> None:
            clock.advance(timedelta(seconds=seconds))

        @precondition(lambda self: self.effective_at is not None and self.status != "erased")
        @rule(offset=st.sampled_from([-1, 0, 1]))
        def advance_to_deadline_edge(self, offset: int) -> None:
            target = self.effective_at + timedelta(seconds=offset)
            if target > clock.now():
                clock.set(target)

        @rule()
        def run_erasure(self) -> None:
            due = self.served_at is not None and clock.now() >= self.effective_at
            outcomes = {o.tenant_id: o.state for o in kms.erasure.run_due()}
            if self.status == "erased":
                assert self.tid not in outcomes
            elif due:
                assert outcomes.get(self.tid) == "erased", outcomes
                assert clock.now() - self.served_at >= NOTICE
                self.status = "erased"
            else:
                assert self.tid not in outcomes

        @invariant()
        def matches_model(self) -> None:
            assert self._actual() == self.status

    Lifecycle.TestCase.settings = settings(
        max_examples=25, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    Lifecycle.TestCase().runTest()
