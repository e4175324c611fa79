"""The source packages stay `ruff` clean and `mypy --strict` clean (STYLE.md, point 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["kms", "hsm", "api", "cli"]


def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "I,F,E,W,B",
                        *PACKAGES], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", *PACKAGES], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
