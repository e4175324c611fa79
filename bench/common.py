"""Shared plumbing for the benchmarks: throwaway homes, server processes started and
stopped by PID, loopback-only HTTP helpers, CPU and memory readings, machine facts.

Everything here targets 127.0.0.1 only; every wait is bounded in time.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
SETUP_TOKEN = REPO / "softhsm-setup" / "setup-token.sh"
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
# Server on core 0, load generator on the last core (the machine has 2).
SERVER_CPUS = "0"
CLIENT_CPUS = str(NCPU - 1)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kms_bin() -> str:
    """The `kms` console script beside the interpreter that runs the bench."""
    candidate = Path(sys.executable).with_name("kms")
    return str(candidate) if candidate.exists() else "kms"


def have_taskset() -> bool:
    return shutil.which("taskset") is not None and NCPU > 1


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    if cpus is None or not have_taskset():
        return list(cmd)
    return ["taskset", "-c", cpus, *cmd]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The caller's environment without any KMS_* or SOFTHSM2_CONF (the Makefile exports
    KMS_HOME for the service; the bench uses its own throwaway homes)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("KMS_") and k != "SOFTHSM2_CONF"}


# -- throwaway homes ----------------------------------------------------------------------

@dataclass
class Home:
    path: Path

    @classmethod
    def create(cls, root: Path, name: str) -> Home:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        home = cls(path)
        env = clean_env()
        env["KMS_HOME"] = str(path)
        subprocess.run([str(SETUP_TOKEN)], env=env, check=True, capture_output=True,
                       timeout=120)
        home.cli("init")
        return home

    def env(self, **extra: str) -> dict[str, str]:
        env = clean_env()
        env["KMS_HOME"] = str(self.path)
        env["SOFTHSM2_CONF"] = str(self.path / "softhsm" / "softhsm2.conf")
        env["KMS_ERASURE_INTERVAL_SECONDS"] = "3600"  # keep the periodic runner quiet
        env.update(extra)
        return env

    @property
    def ca(self) -> Path:
        return self.path / "tls" / "ca.pem"

    def cli(self, *args: str) -> Any:
        out = subprocess.run([kms_bin(), *args, "--json"], env=self.env(), check=True,
                             capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout) if out.stdout.strip() else None

    def tenant_with_principals(self, name: str) -> dict[str, str]:
        """A tenant and one principal of each role; returns {"id", role: token...}."""
        tenant = self.cli("tenant", "create", name)
        out = {"id": tenant["id"]}
        for role in ("tenant-admin", "app", "hypervisor"):
            p = self.cli("principal", "create", "--tenant", tenant["id"], "--role", role,
                         "--name", f"bench-{role}")
            out[role] = p["token"]
        return out


# -- processes ----------------------------------------------------------------------------

@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None
    tls: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"


class Processes:
    """Every process the bench starts, stopped by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []

    def start(self, name: str, cmd: Sequence[str], *, env: dict[str, str], log_path: Path,
              cpus: str | None = None, port: int | None = None, tls: bool = False,
              cwd: Path = REPO) -> Proc:
        fh = open(log_path, "ab")
        popen = subprocess.Popen(pinned(cmd, cpus), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=str(cwd))
        fh.close()
        proc = Proc(name, popen, log_path, port, tls)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self._procs)):
            self.stop(proc)


def wait_ready(proc: Proc, path: str = "/healthz", timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see "
                               f"{proc.log_path}")
        try:
            status, _ = request(proc, "GET", path, timeout=2)
            if status == 200:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready after {timeout:.0f}s ({last}); see {proc.log_path}")


def start_kms(procs: Processes, home: Home, run_dir: Path, name: str, *, tls: bool = False,
              cpus: str | None = SERVER_CPUS, **env_extra: str) -> Proc:
    port, admin_port = free_port(), free_port()
    cmd = [kms_bin(), "serve", "--host", LOOPBACK, "--port", str(port),
           "--admin-port", str(admin_port)]
    if not tls:
        cmd.append("--insecure-http")
    proc = procs.start(name, cmd, env=home.env(**env_extra), log_path=run_dir / f"{name}.log",
                       cpus=cpus, port=port, tls=tls)
    proc.extra["home"] = home
    wait_ready(proc)
    return proc


def start_bare(procs: Processes, home: Home, run_dir: Path, name: str, *, tls: bool = False,
               cpus: str | None = SERVER_CPUS, with_service: bool = False,
               service_app: bool = False, handoffs_only: bool = False) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.bare", "--host", LOOPBACK, "--port", str(port)]
    if with_service:
        cmd.append("--with-service")
    if service_app:
        cmd.append("--service-app")
    if handoffs_only:
        cmd.append("--journal-handoffs-only")
    if tls:
        cmd += ["--tls-cert", str(home.path / "tls" / "server.pem"),
                "--tls-key", str(home.path / "tls" / "server.key")]
    proc = procs.start(name, cmd, env=home.env(), log_path=run_dir / f"{name}.log", cpus=cpus,
                       port=port, tls=tls)
    wait_ready(proc)
    return proc


# -- loopback HTTP for set-up and checks ----------------------------------------------------

def _connection(proc: Proc, timeout: float) -> http.client.HTTPConnection:
    assert proc.port is not None
    if proc.tls:
        ctx = ssl.create_default_context(cafile=str(proc.extra["home"].ca)) \
            if "home" in proc.extra else ssl._create_unverified_context()  # noqa: S323 - bare
        return http.client.HTTPSConnection(LOOPBACK, proc.port, timeout=timeout, context=ctx)
    return http.client.HTTPConnection(LOOPBACK, proc.port, timeout=timeout)


def request(proc: Proc, method: str, path: str, *, token: str | None = None,
            body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    conn = _connection(proc, timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw) if raw else None
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- process readings -------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def context_switches(pid: int) -> int:
    """Context switches (voluntary + involuntary) of every thread of a process so far."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[-1])
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return total


def wait_idle(pids: Sequence[int], *, below: float = 0.05, timeout: float = 60.0) -> float:
    """Wait until the processes use less than `below` of a core for two 0.25 s windows in
    a row (a server may still be working through requests queued by the previous run).
    Bounded by `timeout`; returns the seconds waited."""
    t0 = time.monotonic()
    quiet = 0
    while time.monotonic() - t0 < timeout and quiet < 2:
        before = sum(cpu_seconds(p) for p in pids)
        time.sleep(0.25)
        used = (sum(cpu_seconds(p) for p in pids) - before) / 0.25
        quiet = quiet + 1 if used < below else 0
    return time.monotonic() - t0


def memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- machine ----------------------------------------------------------------------------------

def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0].strip() if text else "?"
    except (OSError, subprocess.SubprocessError):
        return "not found"


def machine_description(home_root: Path) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    osname = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    fs, best = "?", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(home_root).startswith(parts[1]) \
                    and len(parts[1]) > len(best):
                best, fs = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    versions = []
    for pkg in ("fastapi", "starlette", "uvicorn", "h11", "pydantic", "sqlalchemy",
                "cryptography", "python-pkcs11"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    return {
        "cpu": f"{cpu}, {NCPU} logical cores (os.cpu_count)",
        "memory": mem,
        "os": f"{osname}, Linux {platform.release()}",
        "python": f"CPython {platform.python_version()}",
        "packages": ", ".join(versions),
        "softhsm": _first_line(["softhsm2-util", "--version"]),
        "wrk": _first_line(["wrk", "--version"]).split(" Copyright")[0],
        "storage": f"SQLite {__import__('sqlite3').sqlite_version} (WAL, synchronous=FULL) "
                   f"and the SoftHSM file token in {home_root}, on {fs}",
        "pinning": (f"servers on CPU {SERVER_CPUS}, load generator on CPU {CLIENT_CPUS} "
                    "(taskset)") if have_taskset() else "no pinning (taskset or cores missing)",
    }


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - t0
