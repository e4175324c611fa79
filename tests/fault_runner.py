"""Run the erasure runner in this process and SIGKILL it right after one step commits.

Used by tests as `python -m tests.fault_runner STEP` (under faketime); environment as
for `kms` (KMS_HOME, SOFTHSM2_CONF)."""

from __future__ import annotations

import os
import signal
import sys

from cli.wiring import build_kms
from kms.config import load_settings


def main() -> None:
    target = sys.argv[1]
    kms = build_kms(load_settings(None))

    def kill_after(tenant_id: str, step: str) -> None:
        if step == target:
            os.kill(os.getpid(), signal.SIGKILL)

    kms.erasure._after_step = kill_after
    kms.erasure.run_due()


if __name__ == "__main__":
    main()
