"""Crashes and token faults during erasure: the next run always completes, a tenant is
never marked erased while any of its objects remains, and exactly one certificate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from hsm import HsmDestroyUnconfirmed
from kms.erasure import STEPS, ErasureRunner
from kms.keyring import tenant_label_prefix
from kms.models import Certificate
from tests.conftest import REPO, SETUP_TOKEN, populate

NOTICE = timedelta(days=21)


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing catches it."""


class FaultyHsm:
    """Wraps the real adapter; `destroy` misbehaves as told, everything else is real."""

    def __init__(self, real: Any, mode: str):
        self._real, self.mode = real, mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def destroy(self, cka_id: bytes) -> None:
        if self.mode == "refuse":
            raise HsmDestroyUnconfirmed("the token refused to destroy the object")
        if self.mode == "lie":
            return  # reports success, destroys nothing
        if self.mode == "crash_after_destroy":
            self._real.destroy(cka_id)
            raise Crash()
        self._real.destroy(cka_id)

    def destroy_by_label_prefix(self, prefix: str) -> list[bytes]:
        if self.mode == "lie":
            return []
        return self._real.destroy_by_label_prefix(prefix)

    def destroy_objects(self, prefix: str, cka_ids: Any = ()) -> list[Any]:
        """The erasure's one-pass destroy, misbehaving like `destroy`."""
        if self.mode == "refuse":
            raise HsmDestroyUnconfirmed("the token refused to destroy the object")
        if self.mode == "lie":
            return []  # reports success, destroys nothing
        gone = self._real.destroy_objects(prefix, cka_ids)
        if self.mode == "crash_after_destroy":
            raise Crash()
        return gone


def runner(kms, *, hsm=None, after_step=None) -> ErasureRunner:  # type: ignore[no-untyped-def]
    return ErasureRunner(db=kms.db, hsm=hsm or kms.hsm, signer=kms.signer, clock=kms.clock,
                         drop_cached=kms.drop_cached, audit=kms.audit,
                         after_step=after_step)


def assert_completely_erased(kms, tid: str) -> None:  # type: ignore[no-untyped-def]
    assert kms.tenants.show(tid).status == "erased"
    assert kms.hsm.find_objects(label_prefix=tenant_label_prefix(tid)) == []
    with kms.db.read() as s:
        assert s.query(Certificate).filter_by(tenant_id=tid).count() == 1
    cert = json.loads(kms.erasure.certificate(tid)[0])
    assert cert["deleted_rows"]["volumes"] == 2 and cert["destroyed_objects"]


@pytest.mark.parametrize("step", STEPS)
def test_crash_after_each_step_is_completed_by_next_run(clocked, step) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    tid, _, _ = populate(kms, f"crash after {step}", volumes=2, keys=1)
    kms.lifecycle.serve_notice(tid)
    clock.advance(NOTICE)

    def crash(tenant_id: str, done: str) -> None:
        if done == step:
            raise Crash()

    with pytest.raises(Crash):
        runner(kms, after_step=crash).erase(tid)
    status = kms.tenants.show(tid).status
    assert status != "erased" or step == "mark_erased"
    assert runner(kms).erase(tid).state in ("erased", "skipped")
    assert_completely_erased(kms, tid)


def test_crash_between_destroy_and_its_record(clocked) -> None:  # type: ignore[no-untyped-def]
    """The KEK is gone from the token but the database does not know yet."""
    kms, clock = clocked
    tid, _, _ = populate(kms, "crash mid destroy", volumes=2)
    kms.lifecycle.serve_notice(tid)
    clock.advance(NOTICE)
    with pytest.raises(Crash):
        runner(kms, hsm=FaultyHsm(kms.hsm, "crash_after_destroy")).erase(tid)
    assert runner(kms).erase(tid).state == "erased"
    assert_completely_erased(kms, tid)


@pytest.mark.parametrize("mode", ["refuse", "lie"])
def test_token_that_keeps_the_key_leaves_erasure_failed(clocked, mode) -> None:  # type: ignore[no-untyped-def]
    """A refused destroy, or a destroy that claims success but leaves the object, ends in
    `erasure_failed` (never erased); the next run on a sound token completes."""
    kms, clock = clocked
    tid, _, _ = populate(kms, f"token {mode}", volumes=2)
    kms.lifecycle.serve_notice(tid)
    clock.advance(NOTICE)
    outcome = runner(kms, hsm=FaultyHsm(kms.hsm, mode)).erase(tid)
    assert outcome.state == "erasure_failed" and outcome.error == "destroy_unconfirmed"
    assert kms.tenants.show(tid).status == "erasing"
    assert kms.hsm.find_objects(label_prefix=tenant_label_prefix(tid))
    row = [r for r in kms.erasure.status() if r["tenant_id"] == tid][0]
    assert row["state"] == "erasure_failed" and row["last_error"] == "destroy_unconfirmed"
    with pytest.raises(Exception):
        kms.erasure.certificate(tid)
    assert runner(kms).erase(tid).state == "erased"
    assert_completely_erased(kms, tid)


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", "-R", flag, str(path)], capture_output=True).returncode == 0


def test_read_only_token_directory_leaves_erasure_failed(clocked, kms_home) -> None:  # type: ignore[no-untyped-def]
    """The real token refuses the destroy (its files made immutable): erasure_failed, and
    after the fix the next run completes."""
    kms, clock = clocked
    tid, _, _ = populate(kms, "immutable token", volumes=2)
    kms.lifecycle.serve_notice(tid)
    clock.advance(NOTICE)
    tokens = kms_home / "softhsm" / "tokens"
    if shutil.which("chattr") is None or not _chattr("+i", tokens):
        pytest.skip("this filesystem cannot make the token immutable (chattr +i); the "
                    "FaultyHsm tests cover the same path")
    try:
        outcome = kms.erasure.erase(tid)
    finally:
        assert _chattr("-i", tokens)
    assert outcome.state == "erasure_failed", outcome
    assert kms.tenants.show(tid).status == "erasing"
    assert kms.erasure.erase(tid).state == "erased"
    assert_completely_erased(kms, tid)


# -- a real process killed with SIGKILL, then the real `kms erasure run` -----------------

KMS = str(Path(sys.executable).parent / "kms")


@pytest.fixture(scope="module")
def proc_home(tmp_path_factory):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("killed-runner")
    env = _env(home)
    subprocess.run([str(SETUP_TOKEN)], env=env, check=True, capture_output=True)
    subprocess.run([KMS, "init"], env=env, check=True, capture_output=True)
    return home


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env.update(KMS_HOME=str(home), SOFTHSM2_CONF=str(home / "softhsm" / "softhsm2.conf"),
               PYTHONPATH=str(REPO))
    return env


def _faketime(days: int) -> list[str]:
    at = datetime.now(timezone.utc) + timedelta(days=days)
    return ["faketime", at.strftime("%Y-%m-%d %H:%M:%S")]


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime is installed by make")
@pytest.mark.parametrize("step", STEPS)
def test_killed_runner_process_is_completed_by_kms_erasure_run(proc_home, step) -> None:  # type: ignore[no-untyped-def]
    env = _env(proc_home)

    def kms(*args: str, prefix: list[str] | None = None) -> Any:
        return subprocess.run([*(prefix or []), KMS, *args, "--json"], env=env,
                              capture_output=True, text=True, cwd=REPO)

    tid = json.loads(kms("tenant", "create", f"killed at {step}").stdout)["id"]
    assert kms("tenant", "offboard", tid, "--yes").returncode == 0
    # libfaketime preloaded directly: the `faketime` wrapper would catch the SIGKILL's
    # exit and turn it into exit code 1.
    lib = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert lib, "libfaketime missing (make installs faketime)"
    killed = subprocess.run([sys.executable, "-m", "tests.fault_runner", step],
                            env={**env, "LD_PRELOAD": str(lib[0]), "FAKETIME": "+22d"},
                            capture_output=True, cwd=REPO)
    assert killed.returncode == -9, killed.stderr
    done = kms("erasure", "run", prefix=_faketime(22))
    assert done.returncode == 0, done.stderr
    status = {r["tenant_id"]: r for r in json.loads(kms("erasure", "status").stdout)}
    assert status[tid]["state"] == "erased" and status[tid]["tenant_status"] == "erased"
    cert = proc_home / f"{tid}.json"
    assert kms("erasure", "certificate", tid, "-o", str(cert)).returncode == 0
    assert json.loads(cert.read_text())["tenant"]["id"] == tid
    assert kms("erasure", "verify", str(cert)).returncode == 0


def test_a_notice_cancelled_after_the_claim_is_never_erased(clocked) -> None:  # type: ignore[no-untyped-def]
    """The operator cancels between the runner's claim and its point of no return: the
    cancellation wins; nothing is destroyed, no certificate."""
    kms, clock = clocked
    tid, c, _ = populate(kms, "cancelled mid-claim", volumes=1)
    kms.lifecycle.serve_notice(tid)
    clock.advance(NOTICE)
    r = runner(kms)
    real_claim = r._claim

    def claim_then_cancel(tenant_id: str):  # type: ignore[no-untyped-def]
        job = real_claim(tenant_id)
        kms.lifecycle.cancel_notice(tenant_id)
        return job

    r._claim = claim_then_cancel  # type: ignore[method-assign]
    assert r.erase(tid).state == "skipped"
    assert kms.tenants.show(tid).status == "active"
    assert kms.hsm.find_objects(label_prefix=tenant_label_prefix(tid))
    with pytest.raises(Exception):
        kms.erasure.certificate(tid)
    assert kms.volumes.fetch_key(c["hypervisor"], "vol-0").key_bits == 512
    kms.lifecycle.serve_notice(tid)  # a new notice later is erased normally
    clock.advance(NOTICE)
    assert kms.erasure.erase(tid).state == "erased"


def test_status_shows_an_interrupted_erasure(clocked) -> None:  # type: ignore[no-untyped-def]
    kms, clock = clocked
    tid, _, _ = populate(kms, "interrupted status", volumes=1)
    kms.lifecycle.serve_notice(tid)
    clock.advance(NOTICE)

    def crash(tenant_id: str, done: str) -> None:
        if done == "destroy_keys":
            raise Crash()

    with pytest.raises(Crash):
        runner(kms, after_step=crash).erase(tid)
    row = [r for r in kms.erasure.status() if r["tenant_id"] == tid][0]
    assert row["state"] == "interrupted" and row["step"] == "verify_absent"
    assert kms.erasure.erase(tid).state == "erased"
