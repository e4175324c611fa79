"""CPU per request inside the ASGI application, without the HTTP server: the bare app and
the tenant API called by the same in-process driver, so that what the service adds to
the web framework is measured without wrk, sockets or h11 in the way.

    KMS_HOME=<a home made by `kms init`> python -m bench.asgi [--requests N] [--conc C]
        [--profile FILE] [--only NAME]

Prints one JSON object: for each operation, the median over rounds of process CPU
microseconds per request (every thread of the process: the journal writer too) and the
wall-clock rate. Runs in process, on loopback-free fake ASGI messages.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def _scope(path: str, token: str, length: int) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", str(length).encode()),
                        (b"authorization", f"Bearer {token}".encode())],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8443)}


async def _one(app: Any, path: str, token: str, body: bytes) -> int:
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(path, token, len(body)), receive, send)
    return status


async def _drive(app: Any, path: str, token: str, body: bytes, *, n: int, conc: int
                 ) -> tuple[float, float]:
    """(CPU µs per request, requests per second of wall time) for n requests, conc at
    a time."""
    queue = iter(range(n))
    statuses: dict[int, int] = {}

    async def worker() -> None:
        for _ in queue:
            s = await _one(app, path, token, body)
            statuses[s] = statuses.get(s, 0) + 1

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    bad = {s: c for s, c in statuses.items() if s >= 300}
    if bad:
        raise SystemExit(f"{path}: unexpected statuses {bad}")
    return cpu / n * 1e6, n / wall


async def measure(app: Any, path: str, token: str, body: bytes, *, n: int, conc: int,
                  rounds: int) -> tuple[float, float]:
    """Median over `rounds` of (CPU µs per request, requests per second), after a
    warm-up of 300 requests."""
    await _drive(app, path, token, body, n=300, conc=conc)
    runs = [await _drive(app, path, token, body, n=n, conc=conc) for _ in range(rounds)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--conc", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile")
    parser.add_argument("--only")
    args = parser.parse_args()

    from api.app import create_app
    from bench.bare import create_bare_app
    from cli.wiring import build_kms
    from kms.config import load_settings

    settings = load_settings(None)
    kms = build_kms(settings)
    kms.self_test()
    tenant = kms.tenants.create(f"asgi-{os.getpid()}")
    tid = tenant.id
    tokens = {role: kms.principals.create(tenant_id=tid, role=role, name=f"asgi-{role}").token
              for role in ("tenant-admin", "app", "hypervisor")}
    app = create_app(settings, kms)
    bare = create_bare_app()
    pt = base64.b64encode(os.urandom(1024)).decode()
    enc_body = json.dumps({"plaintext": pt}).encode()
    ops: dict[str, tuple[Any, str, str, Callable[[], bytes]]] = {
        "bare": (bare, "/v1/keys/k/encrypt", "x", lambda: enc_body),
        "encrypt": (app, "/v1/keys/k/encrypt", tokens["app"], lambda: enc_body),
        "keyfetch": (app, "/v1/volumes/vol-1/key", tokens["hypervisor"], lambda: b""),
    }

    async def setup() -> None:
        # A key and a volume, through the API itself.
        await _one(app, "/v1/keys", tokens["tenant-admin"],
                   json.dumps({"name": "k", "type": "aes256-gcm"}).encode())
        await _one(app, "/v1/volumes", tokens["hypervisor"],
                   json.dumps({"volume_id": "vol-1"}).encode())

    async def run() -> dict[str, Any]:
        await setup()
        out: dict[str, Any] = {}
        names = [args.only] if args.only else list(ops)
        for name in names:
            a, path, token, body = ops[name]
            cpu, rate = await measure(a, path, token, body(), n=args.requests,
                                      conc=args.conc, rounds=args.rounds)
            out[name] = {"cpu_us_per_request": round(cpu, 1), "requests_per_s": round(rate)}
        return out

    gc.collect()
    gc.freeze()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        result = asyncio.run(run())
        prof.disable()
        prof.dump_stats(args.profile)
    else:
        result = asyncio.run(run())
    print(json.dumps(result))
    kms.close()


if __name__ == "__main__":
    main()
