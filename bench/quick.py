"""A quick look while working on the data plane (not part of `make bench`): the bare
endpoint and the service side by side, a few operations, one home, figures not for
quoting. All traffic to 127.0.0.1; every run bounded (wrk -d).

    python -m bench.quick [--ops bare,encrypt,keyfetch] [--conc 1,16,64] [--seconds 3]
                          [--reps 2] [--env KMS_X=Y ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import wrk
from bench.__main__ import _probe_targets, _setup_tenant, _targets
from bench.common import Home, Processes, start_bare, start_kms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", default="bare,encrypt,keyfetch")
    parser.add_argument("--conc", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--profile", help="py-spy the server under OP (raw file)")
    parser.add_argument("--profile-conc", type=int, default=16)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kms-quick-"))
    run_dir = root / "run"
    run_dir.mkdir()
    home = Home.create(root, "home")
    procs = Processes()
    extra = dict(e.split("=", 1) for e in args.env)
    try:
        kms = start_kms(procs, home, run_dir, "kms", **extra)
        bare = start_bare(procs, home, run_dir, "bare")
        big = start_bare(procs, home, run_dir, "bare-big", with_service=True) \
            if "bare-big" in args.ops else None
        t = _setup_tenant(home, kms, run_dir)
        targets = {**{k: v for k, v in _targets(kms, t).items() if k != "bare"},
                   "bare": _targets(bare, t)["bare"]}
        if big is not None:
            targets["bare-big"] = _targets(big, t)["bare"]
        probe = start_bare(procs, home, run_dir, "probe", service_app=True) \
            if {"noop", "auth"} & set(args.ops.split(",")) else None
        if probe is not None:
            targets.update(_probe_targets(probe, t))
        off = start_kms(procs, home, run_dir, "kms-noaudit", KMS_AUDIT_DATA_PLANE="false",
                        **extra) if any(o.endswith("-noaudit") for o in args.ops.split(",")) \
            else None
        if off is not None:
            targets.update({f"{k}-noaudit": v for k, v in _targets(off, t).items()
                            if k != "bare"})

        ops = args.ops.split(",")
        for op in ops:
            wrk.run([(targets[op], 16)], seconds=1.0, scripts_dir=run_dir / "lua",
                    server_pids=[], tag=f"warm-{op}")
        if args.profile:
            _profile(args.profile, targets, bare if args.profile == "bare" else kms, run_dir,
                     args.profile_conc)
            return
        out: dict[str, dict[int, list[float]]] = {}
        cpu: dict[str, dict[int, list[float]]] = {}
        for _ in range(args.reps):
            for c in map(int, args.conc.split(",")):
                for op in ops:
                    pid = (bare if op == "bare" else big if op == "bare-big"
                           else probe if op in ("noop", "auth")
                           else off if op.endswith("-noaudit") else kms).pid
                    r = wrk.run([(targets[op], c)], seconds=args.seconds,
                                scripts_dir=run_dir / "lua", server_pids=[pid],
                                tag=f"{op}-{c}")
                    out.setdefault(op, {}).setdefault(c, []).append(r.rate * targets[op].unit)
                    cpu.setdefault(op, {}).setdefault(c, []).append(
                        r.server_cpu / r.rate * 1e6 if r.rate else float("nan"))
        medians = {op: {c: round(statistics.median(v)) for c, v in by_c.items()}
                   for op, by_c in out.items()}
        shown: dict[str, dict[int, str]] = {}
        for op, by_c in medians.items():
            base = medians.get("bare")
            shown[op] = {c: (f"{v} ({v / base[c]:.0%})" if base and op != "bare" else str(v))
                         + f", {statistics.median(cpu[op][c]):.0f} us CPU/req"
                         for c, v in by_c.items()}
        print(json.dumps(shown, indent=1))
    finally:
        procs.stop_all()


def _profile(op: str, targets: dict[str, wrk.Target], proc: Any, run_dir: Path,
             conc: int = 16) -> None:
    import shutil
    import subprocess
    import sys
    import threading
    from collections import Counter

    raw = run_dir / f"profile-{op}.txt"
    th = threading.Thread(target=lambda: wrk.run([(targets[op], conc)], seconds=8,
                                                 scripts_dir=run_dir / "lua",
                                                 server_pids=[], tag=f"prof-{op}"))
    th.start()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    subprocess.run([py_spy, "record", "-p", str(proc.pid), "-d", "5", "-r", "250", "-f", "raw",
                    "-o", str(raw), "--nonblocking", "--gil"], capture_output=True, timeout=60)
    th.join()
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        leaf[frames[-1]] += int(count)
        for f in set(frames):
            incl[f] += int(count)
    print(f"{total} samples; leaf:")
    for f, k in leaf.most_common(30):
        print(f"  {k / total:6.1%} {f}")
    print("inclusive:")
    for f, k in incl.most_common(60):
        print(f"  {k / total:6.1%} {f}")


if __name__ == "__main__":
    main()
