"""The HTTP load generator: `wrk` (C, epoll, HdrHistogram latencies) driven by a Lua
script per operation, pinned to its own core. One wrk thread holds all connections.

Each run is bounded in time (`-d`) and in count (the script stops a thread after
`max_requests`; a run that reaches it is flagged, its rate would be wrong).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import CLIENT_CPUS, LOOPBACK, context_switches, cpu_seconds, pinned, wait_idle

_LUA = r"""
local body_file = "@BODY_FILE@"
local body = nil
if body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  body = f:read("*a")
  f:close()
end
wrk.method = "@METHOD@"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer @TOKEN@"
local max_requests = @MAX_REQUESTS@
local unique = @UNIQUE@
local sent = 0
local counter = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_no", #threads)
end

function request()
  sent = sent + 1
  if sent > max_requests then
    wrk.thread:stop()
  end
  if unique then
    counter = counter + 1
    local b = string.format('{"volume_id":"@TAG@-%d-%d"}', thread_no or 0, counter)
    return wrk.format(nil, nil, nil, b)
  end
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  io.write(string.format(
    'BENCH-JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"err_connect":%d,"err_read":%d,"err_write":%d,' ..
    '"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status,
    summary.errors.timeout))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


@dataclass
class Target:
    """One HTTP operation: where, how, with which body; `unit` items per request."""

    name: str
    port: int
    method: str
    path: str
    token: str
    tls: bool = False
    body_file: Path | None = None
    unique_volume_ids: bool = False
    unit: int = 1


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: dict[str, int]
    client_cpu: float  # fraction of one core used by wrk
    server_cpu: float  # fraction of one core used by the server processes
    capped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def write_script(target: Target, scripts_dir: Path, *, max_requests: int, tag: str) -> Path:
    scripts_dir.mkdir(parents=True, exist_ok=True)
    text = (_LUA.replace("@BODY_FILE@", str(target.body_file or ""))
            .replace("@METHOD@", target.method)
            .replace("@TOKEN@", target.token)
            .replace("@MAX_REQUESTS@", str(max_requests))
            .replace("@UNIQUE@", "true" if target.unique_volume_ids else "false")
            .replace("@TAG@", tag))
    path = scripts_dir / f"{target.name}-{tag}.lua"
    path.write_text(text)
    os.chmod(path, 0o600)  # holds a bearer token of a throwaway tenant
    return path


def _spawn(script: Path, url: str, connections: int, seconds: float,
           cpus: str | None) -> subprocess.Popen[str]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(script), url]
    return subprocess.Popen(pinned(cmd, cpus), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _collect(p: subprocess.Popen[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Wait for wrk (bounded), return its JSON summary and its CPU seconds (rusage)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            break
        if time.monotonic() > deadline:
            p.kill()
            pid, status, usage = os.wait4(p.pid, 0)
            break
        time.sleep(0.05)
    p.returncode = os.waitstatus_to_exitcode(status)
    out = p.stdout.read() if p.stdout else ""
    cpu = usage.ru_utime + usage.ru_stime
    for line in out.splitlines():
        if line.startswith("BENCH-JSON "):
            return json.loads(line[len("BENCH-JSON "):]), cpu
    raise RuntimeError(f"wrk gave no summary (exit {p.returncode}): {out[-500:]}")


def run(targets: list[tuple[Target, int]], *, seconds: float, scripts_dir: Path,
        server_pids: list[int], tag: str, cpus: str | None = CLIENT_CPUS) -> WrkResult:
    """Run one wrk per (target on its port, connections) at once, for `seconds`.
    Several wrk (one per server process) are summed: rates add up, p50 is the
    request-weighted mean of the p50s, p99/p90 the worst of them."""
    max_requests = int(200_000 * max(seconds, 1))
    drained = wait_idle(server_pids)
    procs = []
    for i, (target, conns) in enumerate(targets):
        script = write_script(target, scripts_dir, max_requests=max_requests,
                              tag=f"{tag}-{i}")
        url = f"{'https' if target.tls else 'http'}://{LOOPBACK}:{target.port}{target.path}"
        procs.append(_spawn(script, url, conns, seconds, cpus))
    cpu0 = {pid: cpu_seconds(pid) for pid in server_pids}
    switches0 = sum(context_switches(pid) for pid in server_pids)
    t0 = time.monotonic()
    results = []
    client_cpu = 0.0
    for p in procs:
        summary, cpu = _collect(p, timeout=seconds + 30)
        results.append(summary)
        client_cpu += cpu
    wall = time.monotonic() - t0
    server_cpu = sum(cpu_seconds(pid) - cpu0[pid] for pid in server_pids)
    switches = sum(context_switches(pid) for pid in server_pids) - switches0
    requests = sum(r["requests"] for r in results)
    duration = max(r["duration_us"] for r in results) / 1e6
    p50 = (sum(r["p50_us"] * r["requests"] for r in results) / requests) if requests else 0.0
    errors = {k: sum(r[f"err_{k}"] for r in results)
              for k in ("connect", "read", "write", "status", "timeout")}
    capped = any(r["requests"] >= max_requests for r in results)
    return WrkResult(requests=requests, seconds=duration, p50_ms=p50 / 1000,
                     p90_ms=max(r["p90_us"] for r in results) / 1000,
                     p99_ms=max(r["p99_us"] for r in results) / 1000, errors=errors,
                     client_cpu=client_cpu / max(duration, 1e-9),
                     server_cpu=server_cpu / max(wall, 1e-9), capped=capped,
                     extra={"drain_seconds": drained, "context_switches": switches})
