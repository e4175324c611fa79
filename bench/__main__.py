"""`make bench` / `python -m bench`: measure the service against its ceilings and a
peer, side by side in one run, and write BENCHMARKS.md.

    python -m bench [--quick] [--out BENCHMARKS.md] [--seconds S] [--reps N]
                    [--skip-peer] [--skip-profile] [--keep]

Phases (each bounded in time and count; all traffic to 127.0.0.1):
  1. ceilings in process: AES-GCM 1 KiB (`cryptography`), SoftHSM AES-GCM through the
     project's `hsm.Pkcs11Hsm` (serialized), HMAC in the token and in process (the
     journal's segment key), an fsync'd SQLite commit with its CPU time;
  2. HTTP, interleaved rounds: the bare endpoint (bench/bare.py) and the service (`kms
     serve`, one process, pinned to CPU 0; wrk pinned to CPU 1) at concurrency 1/16/64,
     with and without data-plane audit events, plain HTTP and TLS;
  3. py-spy profiles of the service under load (where targets are missed);
  4. the PyKMIP peer and our TLS API under one Python client harness;
  5. N `kms serve` processes sharing one home (SQLite + SoftHSM file token);
  6. erasure: tenants with 10 / 1,000 / 10,000 volume keys, and with 1 MiB to 1 GiB of
     data under their keys, against a one-pass overwrite of the same bytes;
  7. memory: peak RSS of `kms serve` with 10,000 tenants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import profile as prof
from bench import wrk
from bench.common import (
    BENCH_DIR,
    CLIENT_CPUS,
    REPO,
    SERVER_CPUS,
    Home,
    Proc,
    Processes,
    b64,
    free_port,
    log,
    machine_description,
    memory_kib,
    pinned,
    request,
    start_bare,
    start_kms,
)
from bench.report import write_report

PEER_VENV = BENCH_DIR / ".peer-venv"
PEER_REQUIREMENTS = ["pykmip==0.11.0", "py-spy==0.4.3"]


@dataclass
class Settings:
    seconds: float = 3.0
    reps: int = 5
    concurrency: tuple[int, ...] = (1, 16, 64)
    warmup: float = 1.0
    profile_seconds: float = 5.0
    peer_seconds: float = 3.0
    peer_concurrency: tuple[int, ...] = (1, 16)
    erasure_sizes: tuple[int, ...] = (10, 1000, 10_000)
    data_mib: tuple[int, ...] = (1, 64, 1024)
    tenants: int = 10_000
    active_tenants: int = 100
    quick: bool = False


@dataclass
class Spec:
    """One HTTP measurement: an operation against one server."""

    key: str
    label: str
    proc: Proc
    target: wrk.Target
    reps: int
    group: str
    runs: dict[int, list[wrk.WrkResult]] = field(default_factory=dict)


def _peer_venv(run_dir: Path) -> tuple[Path | None, str | None]:
    """bench/.peer-venv with PyKMIP and py-spy, created once; (python, reason-if-not)."""
    python = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / ".installed"
    if marker.exists() and marker.read_text() == " ".join(PEER_REQUIREMENTS):
        return python, None
    log("creating bench/.peer-venv (PyKMIP, py-spy): not project dependencies")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True,
                       capture_output=True, timeout=300)
        res = subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS],
                             capture_output=True, text=True, timeout=600)
        (run_dir / "peer-venv-pip.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            return None, f"pip install {' '.join(PEER_REQUIREMENTS)} failed: " \
                         f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}"
        marker.write_text(" ".join(PEER_REQUIREMENTS))
        return python, None
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"could not create the peer venv: {exc}"


def _inproc(home: Home, run_dir: Path, name: str, args: list[str], *, timeout: float,
            cpus: str | None = None) -> dict[str, Any]:
    log(f"in process: {name} {' '.join(args)}")
    with open(run_dir / f"{name}.stderr.log", "wb") as err:
        res = subprocess.run(pinned([sys.executable, "-m", "bench.inproc", *args], cpus),
                             env=home.env(), cwd=str(REPO), stdout=subprocess.PIPE,
                             stderr=err, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"bench.inproc {args[0]} failed; see {run_dir / name}.stderr.log")
    out: dict[str, Any] = json.loads(res.stdout)
    return out


# -- phase 2: HTTP --------------------------------------------------------------------------

def _setup_tenant(home: Home, server: Proc, run_dir: Path) -> dict[str, Any]:
    t = home.tenant_with_principals("bench http")
    status, body = request(server, "POST", "/v1/keys", token=t["tenant-admin"],
                           body={"name": "bench", "type": "aes256-gcm"})
    assert status == 201, (status, body)
    status, body = request(server, "POST", "/v1/volumes", token=t["hypervisor"],
                           body={"volume_id": "vol-fetch", "cipher": "aes-xts-plain64",
                                 "key_bits": 512})
    assert status == 201, (status, body)
    plaintext = b64(os.urandom(1024))
    status, enc = request(server, "POST", "/v1/keys/bench/encrypt", token=t["app"],
                          body={"plaintext": plaintext})
    assert status == 200, (status, enc)
    bodies = run_dir / "bodies"
    bodies.mkdir(exist_ok=True)
    files = {
        "encrypt": {"plaintext": plaintext},
        "decrypt": {"ciphertext": enc["ciphertext"]},
        "datakey": {"bits": 256},
        "batch": {"batch": [{"plaintext": b64(os.urandom(1024))} for _ in range(1000)]},
    }
    paths = {}
    for name, body in files.items():
        paths[name] = bodies / f"{name}.json"
        paths[name].write_text(json.dumps(body, separators=(",", ":")))
    return {**t, "bodies": paths, "ciphertext": enc["ciphertext"]}


def _probe_targets(proc: Proc, t: dict[str, Any]) -> dict[str, wrk.Target]:
    """The probe routes of `bench.bare --service-app`, with encrypt's body and token, and
    the service's own encrypt and key fetch on that server (whose journal writer, with
    --journal-handoffs-only, writes nothing)."""
    real = _targets(proc, t)
    enc = real["encrypt"]
    return {**{op: dataclasses.replace(enc, name=f"probe-{op}",
                                       path=enc.path.replace("/v1/keys/", f"/v1/bench-{op}/"))
               for op in ("noop", "auth")},
            "encrypt": dataclasses.replace(enc, name="handoffs-encrypt"),
            "keyfetch": dataclasses.replace(real["keyfetch"], name="handoffs-keyfetch")}


def _targets(proc: Proc, t: dict[str, Any]) -> dict[str, wrk.Target]:
    p, tls, bodies = proc.port, proc.tls, t["bodies"]
    assert p is not None
    return {
        "bare": wrk.Target("bare", p, "POST", "/v1/keys/bench/encrypt", t["app"], tls,
                           bodies["encrypt"]),
        "bare-sync": wrk.Target("bare-sync", p, "POST", "/v1/sync/keys/bench/encrypt",
                                t["app"], tls, bodies["encrypt"]),
        "bare-direct": wrk.Target("bare-direct", p, "POST", "/v1/direct/keys/bench/encrypt",
                                  t["app"], tls, bodies["encrypt"]),
        "encrypt": wrk.Target("encrypt", p, "POST", "/v1/keys/bench/encrypt", t["app"], tls,
                              bodies["encrypt"]),
        "decrypt": wrk.Target("decrypt", p, "POST", "/v1/keys/bench/decrypt", t["app"], tls,
                              bodies["decrypt"]),
        "datakey": wrk.Target("datakey", p, "POST", "/v1/keys/bench/datakey", t["app"], tls,
                              bodies["datakey"]),
        "keyfetch": wrk.Target("keyfetch", p, "POST", "/v1/volumes/vol-fetch/key",
                               t["hypervisor"], tls),
        "volcreate": wrk.Target("volcreate", p, "POST", "/v1/volumes", t["hypervisor"], tls,
                                unique_volume_ids=True),
        "batch": wrk.Target("batch", p, "POST", "/v1/keys/bench/encrypt", t["app"], tls,
                            bodies["batch"], unit=1000),
    }


def _check(spec: Spec) -> None:
    """One request by hand before any load: the operation must answer 2xx."""
    tg = spec.target
    body = json.loads(tg.body_file.read_text()) if tg.body_file else None
    if tg.unique_volume_ids:
        body = {"volume_id": f"check-{spec.key}-{time.time_ns()}"}
    status, answer = request(spec.proc, tg.method, tg.path, token=tg.token, body=body)
    if status >= 300:
        raise RuntimeError(f"{spec.key}: {tg.method} {tg.path} answered {status}: "
                           f"{str(answer)[:300]}")


def _run_spec(spec: Spec, c: int, seconds: float, run_dir: Path, tag: str) -> wrk.WrkResult:
    res = wrk.run([(spec.target, c)], seconds=seconds, scripts_dir=run_dir / "lua",
                  server_pids=[spec.proc.pid], tag=tag)
    if res.error_count or res.capped:
        log(f"  !! {spec.key} c={c}: errors {res.errors} capped={res.capped}")
    return res


def http_rounds(specs: list[Spec], cfg: Settings, run_dir: Path) -> None:
    for spec in specs:
        _check(spec)
    log(f"warm-up: {len(specs)} operations x {cfg.warmup:.0f}s")
    for spec in specs:
        _run_spec(spec, 16, cfg.warmup, run_dir, f"warm-{spec.key}")
    total = sum(len(cfg.concurrency) * min(s.reps, cfg.reps) for s in specs)
    n = 0
    for r in range(cfg.reps):
        for c in cfg.concurrency:
            for spec in specs:
                if r >= spec.reps:
                    continue
                n += 1
                res = _run_spec(spec, c, cfg.seconds, run_dir, f"{spec.key}-c{c}-r{r}")
                spec.runs.setdefault(c, []).append(res)
                log(f"[{n}/{total}] {spec.label} c={c}: {res.rate * spec.target.unit:,.0f}/s "
                    f"p50 {res.p50_ms:.2f} ms p99 {res.p99_ms:.2f} ms "
                    f"(server CPU {res.server_cpu:.0%}, wrk CPU {res.client_cpu:.0%})")


def profile_specs(specs: dict[str, Spec], plan: list[tuple[str, str, str | None]],
                  cfg: Settings, run_dir: Path, py_spy: Path) -> dict[str, Any]:
    """plan: (spec key, "gil" | "wall", only-frame filter or None)."""
    out: dict[str, Any] = {}
    for key, mode, only in plan:
        spec = specs[key]
        raw = run_dir / f"profile-{key}-{mode}.txt"
        log(f"profiling {spec.label} ({key}) at c=16 for {cfg.profile_seconds:.0f}s "
            f"(py-spy, {mode})")
        box: dict[str, wrk.WrkResult] = {}

        def load(spec: Spec = spec, box: dict[str, wrk.WrkResult] = box,
                 key: str = key) -> None:
            box["r"] = _run_spec(spec, 16, cfg.profile_seconds + 2, run_dir, f"prof-{key}")

        th = threading.Thread(target=load)
        th.start()
        time.sleep(1.0)
        ok = prof.record(py_spy, spec.proc.pid, cfg.profile_seconds, raw, mode=mode)
        th.join(timeout=cfg.profile_seconds + 60)
        name = f"{key}-{mode}"
        if ok:
            out[name] = {**prof.summarize(raw, only=only), "label": spec.label, "mode": mode,
                         "only": only, "raw": str(raw),
                         "rate": box["r"].rate * spec.target.unit if "r" in box else None}
        else:
            out[name] = {"label": spec.label, "mode": mode,
                         "error": "py-spy could not attach (ptrace not permitted?)"}
    return out


# -- phase 4: the peer -----------------------------------------------------------------------

def peer_phase(peer_python: Path, home: Home, tenant: dict[str, Any], ours: Proc,
               ours_noaudit: Proc, cfg: Settings, run_dir: Path,
               procs: Processes) -> dict[str, Any]:
    d = run_dir / "peer"
    d.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    subprocess.run([str(peer_python), "-m", "bench.peer", "pki", "--dir", str(d)], check=True,
                   cwd=str(REPO), env=env, capture_output=True, timeout=120)
    port = free_port()
    server = procs.start("pykmip-server", [str(peer_python), "-m", "bench.peer", "serve",
                                           "--dir", str(d), "--port", str(port)],
                         env=env, log_path=run_dir / "pykmip-server.stdout.log",
                         cpus=SERVER_CPUS, port=port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            raise RuntimeError(f"PyKMIP server exited; see {server.log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    tokens = run_dir / "peer-tokens.json"
    tokens.write_text(json.dumps({"app": tenant["app"], "hypervisor": tenant["hypervisor"],
                                  "key": "bench", "volume": "vol-fetch"}))
    os.chmod(tokens, 0o600)
    log("peer: PyKMIP vs ours, one Python client harness")
    with open(run_dir / "peer-client.stderr.log", "wb") as err:
        res = subprocess.run(pinned([str(peer_python), "-m", "bench.peer", "client", "--dir",
                                     str(d), "--kmip-port", str(port), "--ours-port",
                                     str(ours.port), "--ours-noaudit-port",
                                     str(ours_noaudit.port), "--ours-ca", str(home.ca),
                                     "--tokens-file", str(tokens), "--server-pids",
                                     f"pykmip:{server.pid},ours:{ours.pid},"
                                     f"ours-noaudit:{ours_noaudit.pid}", "--seconds",
                                     str(cfg.peer_seconds), "--concurrency",
                                     ",".join(map(str, cfg.peer_concurrency))], CLIENT_CPUS),
                             cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=err,
                             timeout=900)
    procs.stop(server)
    if res.returncode != 0:
        raise RuntimeError(f"peer client failed; see {run_dir / 'peer-client.stderr.log'}")
    out: dict[str, Any] = json.loads(res.stdout)
    return out


# -- phase 5: N processes ---------------------------------------------------------------------

WORKER_CONFIGS = (("1 process on CPU 0", 1, True), ("1 process, unpinned", 1, False),
                  ("2 processes, unpinned", 2, False), ("2 processes, one per core", 2, True))


def _set_affinity(pids: list[int], pinned_to_own_core: bool) -> None:
    """Every thread of each process: on its own core (process i on CPU i), or on all."""
    if not shutil.which("taskset"):
        return
    for i, pid in enumerate(pids):
        cpus = str(i % (os.cpu_count() or 1)) if pinned_to_own_core else \
            f"0-{(os.cpu_count() or 1) - 1}"
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True,
                       capture_output=True, timeout=10)


def workers_phase(home: Home, tenant: dict[str, Any], cfg: Settings, run_dir: Path,
                  procs: Processes) -> dict[str, Any]:
    """1 vs 2 `kms serve` processes on one home (SQLite + SoftHSM file token), pinned or
    not; wrk is not pinned and shares the 2 cores with them. The bare endpoint likewise,
    as the ceiling of each setup."""
    kms_procs = [start_kms(procs, home, run_dir, f"kms-worker-{i}", cpus=None)
                 for i in range(2)]
    bare_procs = [start_bare(procs, home, run_dir, f"bare-worker-{i}", cpus=None)
                  for i in range(2)]
    results: dict[str, Any] = {}
    try:
        for op in ("bare", "encrypt", "keyfetch"):  # warm-up: caches, usage ranges, pools
            for p in (bare_procs if op == "bare" else kms_procs):
                wrk.run([(_targets(p, tenant)[op], 16)], seconds=cfg.warmup,
                        scripts_dir=run_dir / "lua", server_pids=[p.pid],
                        tag=f"workers-warm-{op}-{p.pid}", cpus=None)
        for c in (16, 64):
            for name, n, pin in WORKER_CONFIGS:
                if c == 16 and not pin:
                    continue
                for op in ("bare", "encrypt", "keyfetch"):
                    chosen = (bare_procs if op == "bare" else kms_procs)[:n]
                    _set_affinity([p.pid for p in chosen], pin)
                    per = [c // n + (1 if i < c % n else 0) for i in range(n)]
                    targets = [(_targets(p, tenant)[op], k)
                               for p, k in zip(chosen, per, strict=True)]
                    res = wrk.run(targets, seconds=cfg.seconds, scripts_dir=run_dir / "lua",
                                  server_pids=[p.pid for p in chosen],
                                  tag=f"workers-{op}-{n}-{int(pin)}-{c}", cpus=None)
                    results[f"{op}|{name}|{c}"] = res
                    log(f"workers: {op}, {name}, c={c}: {res.rate:,.0f}/s "
                        f"p50 {res.p50_ms:.2f} ms p99 {res.p99_ms:.2f} ms "
                        f"errors {res.error_count}")
    finally:
        for p in kms_procs + bare_procs:
            procs.stop(p)
    return results


# -- phase 7: memory ---------------------------------------------------------------------------

def _exercise(server: Proc, active: list[dict[str, str]]) -> dict[str, int]:
    """A few requests of every kind across the tenants: keys unwrapped, cached, used."""
    counts = {"ok": 0, "failed": 0}
    deadline = time.monotonic() + 300
    for i, t in enumerate(active):
        if time.monotonic() > deadline:
            break
        calls = [
            ("POST", "/v1/keys", t["tenant-admin"], {"name": "k", "type": "aes256-gcm"}),
            ("POST", "/v1/keys/k/encrypt", t["app"], {"plaintext": b64(b"x" * 1024)}),
            ("POST", "/v1/keys/k/datakey", t["app"], {"bits": 256}),
            ("POST", "/v1/volumes", t["hypervisor"], {"volume_id": f"v{i}"}),
            ("POST", f"/v1/volumes/v{i}/key", t["hypervisor"], None),
            ("GET", "/v1/tenant", t["app"], None),
        ]
        for method, path, token, body in calls:
            status, answer = request(server, method, path, token=token, body=body)
            counts["ok" if status < 300 else "failed"] += 1
            if path.endswith("/encrypt") and status == 200:
                status, _ = request(server, "POST", "/v1/keys/k/decrypt", token=t["app"],
                                    body={"ciphertext": answer["ciphertext"]})
                counts["ok" if status < 300 else "failed"] += 1
    return counts


def memory_phase(root: Path, cfg: Settings, run_dir: Path, procs: Processes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, tenants in (("small", cfg.active_tenants), ("large", cfg.tenants)):
        home = Home.create(root, f"mem-{label}")
        pop = _inproc(home, run_dir, f"populate-{label}",
                      ["populate", "--tenants", str(tenants), "--active",
                       str(cfg.active_tenants), "--probe", "20", "--fast-setup",
                       "--max-seconds", "420"], timeout=700)
        server = start_kms(procs, home, run_dir, f"kms-mem-{label}")
        started = memory_kib(server.pid)
        t0 = time.perf_counter()
        counts = _exercise(server, pop["active"])
        exercise_seconds = time.perf_counter() - t0
        peak = memory_kib(server.pid)
        procs.stop(server)
        row = {"tenants": pop["tenants"], "requested": tenants,
               "populate_seconds": pop["seconds"], "probe_rate": pop["probe_rate"],
               "rss_after_start_kib": started.get("VmRSS"), "rss_kib": peak.get("VmRSS"),
               "hwm_kib": peak.get("VmHWM"), "requests": counts,
               "exercise_seconds": exercise_seconds, "exercised_tenants": len(pop["active"])}
        if label == "large":
            row["erase_one"] = _inproc(home, run_dir, "erase-one-large",
                                       ["erase-one", "--tenant", pop["active"][0]["id"]],
                                       timeout=300)
            row["erase_one_profiled"] = _inproc(home, run_dir, "erase-one-large-profiled",
                                                ["erase-one", "--profile", "--tenant",
                                                 pop["active"][1]["id"]], timeout=300)
            row["token_objects"] = sum(1 for _ in (home.path / "softhsm" / "tokens")
                                       .glob("*/*.object"))
        log(f"memory ({row['tenants']} tenants): VmHWM {row['hwm_kib']} KiB, requests {counts} "
            f"in {exercise_seconds:.1f}s; tenant create {pop['probe_rate'] or 0:.1f}/s")
        out[label] = row
    return out


# -- main ----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, small sizes (a smoke "
                        "test of the bench itself; figures not for quoting)")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway homes")
    parser.add_argument("--report-only", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: write the report again from a run's results")
    args = parser.parse_args()
    if args.report_only:
        saved: dict[str, Any] = json.loads(args.report_only.read_text())
        print(write_report(saved, args.out, args.report_only.parent))
        return 0

    cfg = Settings()
    if args.quick:
        cfg = Settings(seconds=1.0, reps=1, warmup=1.0, profile_seconds=2.0, peer_seconds=1.0,
                       erasure_sizes=(10, 100, 1000), data_mib=(1, 8, 32), tenants=300,
                       active_tenants=10, quick=True)
    if args.seconds:
        cfg.seconds = args.seconds
    if args.reps:
        cfg.reps = args.reps
    if not wrk.available():
        print("bench: wrk is missing (apt-get install wrk; `make bench` installs it)",
              file=sys.stderr)
        return 2

    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    run_dir = BENCH_DIR / "runs" / started.strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="kms-bench-"))
    command = "make bench" if os.environ.get("MAKELEVEL") else \
        "python -m bench " + " ".join(sys.argv[1:])
    results: dict[str, Any] = {"started": started.isoformat(timespec="seconds"),
                               "command": command.strip(), "settings": cfg.__dict__,
                               "machine": machine_description(root), "notes": []}
    procs = Processes()
    log(f"run directory {run_dir}, homes under {root}")
    try:
        peer_python, why = (None, "skipped (--skip-peer)") if args.skip_peer and \
            args.skip_profile else _peer_venv(run_dir)
        if why:
            results["notes"].append(f"peer venv: {why}")
        py_spy = PEER_VENV / "bin" / "py-spy" if peer_python else None

        # -- phase 1 and 2 --
        home = Home.create(root, "http")
        kms_http = start_kms(procs, home, run_dir, "kms-http")
        tenant = _setup_tenant(home, kms_http, run_dir)
        kms_noaudit = start_kms(procs, home, run_dir, "kms-http-noaudit",
                                KMS_AUDIT_DATA_PLANE="false")
        # Volume keys always from the token (a first release): the cache off.
        kms_cold = start_kms(procs, home, run_dir, "kms-http-nocache",
                             KMS_VOLUME_KEY_CACHE_SECONDS="0")
        kms_tls = start_kms(procs, home, run_dir, "kms-tls", tls=True)
        kms_tls_noaudit = start_kms(procs, home, run_dir, "kms-tls-noaudit", tls=True,
                                    KMS_AUDIT_DATA_PLANE="false")
        bare_http = start_bare(procs, home, run_dir, "bare-http")
        bare_tls = start_bare(procs, home, run_dir, "bare-tls", tls=True)
        # The service's own app (middleware, exception handlers, routing table, a process
        # holding the service) with two probe routes: the bare route's constant, and the
        # same after authenticating through the inline call (`bench.bare.add_probe_routes`).
        # Its journal writer writes nothing: its encrypt and key fetch are the service's
        # with every hand-off of the group commit but none of the writer's own work.
        probe_http = start_bare(procs, home, run_dir, "probe-http", service_app=True,
                                handoffs_only=True)

        results["ceilings"] = _inproc(home, run_dir, "ceilings",
                                      ["ceilings", "--seconds", "1" if cfg.quick else "2"],
                                      timeout=120, cpus=SERVER_CPUS)
        # What a request cannot do without, piece by piece, on the server's core (its own
        # home: it writes journal events).
        results["floor"] = _inproc(Home.create(root, "floor"), run_dir, "floor",
                                   ["floor", "--seconds", "0.5" if cfg.quick else "1"],
                                   timeout=300, cpus=SERVER_CPUS)

        tg = {"http": _targets(kms_http, tenant), "noaudit": _targets(kms_noaudit, tenant),
              "cold": _targets(kms_cold, tenant),
              "tls": _targets(kms_tls, tenant), "bare": _targets(bare_http, tenant),
              "bare-tls": _targets(bare_tls, tenant), "probe": _probe_targets(probe_http, tenant)}
        R = cfg.reps
        spec_rows = [
            ("bare", "bare endpoint (HTTP ceiling)", bare_http, tg["bare"]["bare"], R, "http"),
            ("probe-noop", "the service's app, a route answering the bare constant",
             probe_http, tg["probe"]["noop"], R, "probe"),
            ("probe-auth", "the same route, after authenticating (inline call)", probe_http,
             tg["probe"]["auth"], R, "probe"),
            ("encrypt", "encrypt 1 KiB", kms_http, tg["http"]["encrypt"], R, "http"),
            ("keyfetch", "volume key fetch (cached key)", kms_http, tg["http"]["keyfetch"], R,
             "http"),
            ("keyfetch-cold", "volume key fetch, cache off (every fetch unwraps in the token)",
             kms_cold, tg["cold"]["keyfetch"], R, "http"),
            # Journal off, right after: the journal's cost per request is on − off.
            ("encrypt-noaudit", "encrypt 1 KiB", kms_noaudit, tg["noaudit"]["encrypt"], R,
             "noaudit"),
            ("keyfetch-noaudit", "volume key fetch (cached key)", kms_noaudit,
             tg["noaudit"]["keyfetch"], R, "noaudit"),
            # The group commit's hand-offs alone (the writer writes nothing): on − this is
            # the writer's own work over HTTP, this − off what handing events to it costs.
            ("encrypt-handoffs", "encrypt 1 KiB", probe_http, tg["probe"]["encrypt"], R,
             "probe"),
            ("keyfetch-handoffs", "volume key fetch (cached key)", probe_http,
             tg["probe"]["keyfetch"], R, "probe"),
            ("bare-sync", "bare, as a `def` route (one thread-pool hop)", bare_http,
             tg["bare"]["bare-sync"], 1, "http"),
            ("bare-direct", "bare, through the service's route class (called directly, "
             "no dependency resolution)", bare_http, tg["bare"]["bare-direct"], R, "http"),
            ("batch", "batch encrypt 1000 x 1 KiB", kms_http, tg["http"]["batch"], R, "http"),
            ("decrypt", "decrypt 1 KiB", kms_http, tg["http"]["decrypt"], 1, "http"),
            ("datakey", "datakey 256", kms_http, tg["http"]["datakey"], 1, "http"),
            ("volcreate", "volume create", kms_http, tg["http"]["volcreate"], 1, "http"),
            ("decrypt-noaudit", "decrypt 1 KiB", kms_noaudit, tg["noaudit"]["decrypt"], 1,
             "noaudit"),
            ("datakey-noaudit", "datakey 256", kms_noaudit, tg["noaudit"]["datakey"], 1,
             "noaudit"),
            ("bare-tls", "bare endpoint, TLS", bare_tls, tg["bare-tls"]["bare"], 1, "tls"),
            ("encrypt-tls", "encrypt 1 KiB, TLS", kms_tls, tg["tls"]["encrypt"], 1, "tls"),
            ("keyfetch-tls", "volume key fetch, TLS", kms_tls, tg["tls"]["keyfetch"], 1, "tls"),
        ]
        specs = {k: Spec(k, label, p, t, reps, g) for k, label, p, t, reps, g in spec_rows}
        http_rounds(list(specs.values()), cfg, run_dir)
        results["http"] = {k: {"label": s.label, "group": s.group, "unit": s.target.unit,
                               "runs": {c: [r.__dict__ for r in rs] for c, rs in s.runs.items()}}
                           for k, s in specs.items()}
        results["kms_http_memory"] = memory_kib(kms_http.pid)

        # -- phase 3 --
        if py_spy is not None and py_spy.exists() and not args.skip_profile:
            results["profiles"] = profile_specs(
                specs, [("bare", "gil", None), ("encrypt", "gil", None),
                        ("keyfetch", "gil", None), ("keyfetch-cold", "gil", None),
                        ("batch", "gil", None),
                        ("encrypt-noaudit", "gil", None),
                        ("volcreate", "gil", None)],
                cfg, run_dir, py_spy)
        else:
            results["notes"].append("profiles: skipped (no py-spy or --skip-profile)")

        # -- phase 4 --
        if peer_python is not None and not args.skip_peer:
            try:
                results["peer"] = peer_phase(peer_python, home, tenant, kms_tls,
                                             kms_tls_noaudit, cfg, run_dir, procs)
            except Exception as exc:  # noqa: BLE001 - recorded in the report
                results["notes"].append(f"peer: {exc}")
                log(f"peer failed: {exc}")
        for p in (kms_http, kms_noaudit, kms_cold, kms_tls, kms_tls_noaudit, bare_http,
                  bare_tls, probe_http):
            procs.stop(p)

        # -- phase 5 --
        results["workers"] = {k: v.__dict__ for k, v in
                              workers_phase(home, tenant, cfg, run_dir, procs).items()}

        # -- phase 6 --
        eh = Home.create(root, "erasure")
        results["erasure"] = _inproc(
            eh, run_dir, "erasure",
            ["erasure", "--sizes", ",".join(map(str, cfg.erasure_sizes)), "--data-mib",
             ",".join(map(str, cfg.data_mib)), "--work-dir", str(eh.path / "data"),
             "--max-seconds", "600"], timeout=700)

        # -- phase 7 --
        results["memory"] = memory_phase(root, cfg, run_dir, procs)
    except Exception:
        (run_dir / "error.txt").write_text(traceback.format_exc())
        results["notes"].append("the run stopped early: " +
                                traceback.format_exc().strip().splitlines()[-1])
        log(traceback.format_exc())
    finally:
        procs.stop_all()
        results["elapsed_seconds"] = time.monotonic() - t_start
        (run_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    table = write_report(results, args.out, run_dir)
    print(table)
    log(f"wrote {args.out} ({results['elapsed_seconds']:.0f}s); raw results in "
        f"{run_dir / 'results.json'}")
    return 0 if not any(n.startswith("the run stopped early") for n in results["notes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
