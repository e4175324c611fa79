"""In-process measurements, each run in its own subprocess with one throwaway home
(SoftHSM reads its configuration once per process, at C_Initialize):

    python -m bench.inproc ceilings  --seconds S
    python -m bench.inproc erasure   --sizes 10,1000,10000 --data-mib 1,64,1024 --work-dir D
    python -m bench.inproc populate  --tenants N --active K
    python -m bench.inproc erase-one --tenant T
    python -m bench.inproc floor     --seconds S

KMS_HOME and SOFTHSM2_CONF come from the environment. Each prints one JSON document on
stdout. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bench.common import percentile

PAST_DEADLINE = timedelta(days=22)  # the notice is 21 days


def _bounded_rate(fn: Callable[[], object], *, seconds: float, max_ops: int,
                  chunk: int = 64) -> dict[str, float]:
    """Call fn until `seconds` have passed or `max_ops` calls; returns ops/s, the
    p50/p99 of per-chunk mean latencies and the calling thread's CPU time per call
    (user + system, which includes the kernel's share of an fsync), in microseconds."""
    n, lat = 0, []
    cpu0 = time.thread_time()
    start = time.perf_counter()
    deadline = start + seconds
    while n < max_ops:
        t0 = time.perf_counter()
        for _ in range(chunk):
            fn()
        t1 = time.perf_counter()
        n += chunk
        lat.append((t1 - t0) / chunk * 1e6)
        if t1 >= deadline:
            break
    elapsed = time.perf_counter() - start
    cpu = time.thread_time() - cpu0
    return {"ops": n, "seconds": elapsed, "rate": n / elapsed,
            "p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99),
            "cpu_us": cpu / n * 1e6}


def _kms(clock: Any = None) -> Any:
    from cli.wiring import build_kms
    from kms.config import load_settings

    return build_kms(load_settings(None), clock=clock)


def ceilings(args: argparse.Namespace) -> dict[str, Any]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from cli.wiring import build_kms  # noqa: F401 - sets SOFTHSM2_CONF if needed
    from hsm import Pkcs11Hsm
    from kms.config import load_settings
    from kms.service import read_secret_file

    out: dict[str, Any] = {}
    secs = args.seconds
    aes = AESGCM(os.urandom(32))
    data, aad = os.urandom(1024), b"key=bench|version=1|context="
    out["aesgcm_encrypt_1k"] = _bounded_rate(lambda: aes.encrypt(os.urandom(12), data, aad),
                                             seconds=secs, max_ops=10_000_000)
    nonce = os.urandom(12)
    sealed = aes.encrypt(nonce, data, aad)
    out["aesgcm_decrypt_1k"] = _bounded_rate(lambda: aes.decrypt(nonce, sealed, aad),
                                             seconds=secs, max_ops=10_000_000)

    settings = load_settings(None)
    pin_file = settings.effective_pin_file
    hsm = Pkcs11Hsm(module_path=settings.effective_pkcs11_module,
                    token_label=settings.hsm_token_label,
                    pin_reader=lambda: read_secret_file(pin_file))
    kek = hsm.generate_aes_kek(label="bench/ceiling/kek")
    key, iv = os.urandom(64), os.urandom(12)
    place = b"kms:v1|tenant=t-bench|kind=volume|id=vol-1|version=1"
    wrapped = hsm.gcm_encrypt(kek, key, iv=iv, aad=place)
    assert hsm.gcm_decrypt(kek, wrapped, iv=iv, aad=place) == key
    out["hsm_gcm_decrypt_64b"] = _bounded_rate(
        lambda: hsm.gcm_decrypt(kek, wrapped, iv=iv, aad=place), seconds=secs, max_ops=2_000_000)
    out["hsm_gcm_encrypt_64b"] = _bounded_rate(
        lambda: hsm.gcm_encrypt(kek, key, iv=os.urandom(12), aad=place), seconds=secs,
        max_ops=2_000_000)
    mac_key = hsm.generate_hmac_key(label="bench/ceiling/hmac")
    event = b'{"action":"key.encrypt","actor":"p-0123456789abcdef","object":"key:k:v1"}' * 3
    out["hsm_hmac_sha256"] = _bounded_rate(lambda: hsm.hmac_sha256(mac_key, event),
                                           seconds=secs, max_ops=2_000_000)
    # What the journal does per event now: an HMAC in process under the segment's key,
    # which the token derived once for the whole segment.
    segment_key = hsm.hmac_sha256(mac_key, b"kms/audit-segment/v1|s-bench")
    out["hmac_sha256_segment"] = _bounded_rate(
        lambda: hmac.new(segment_key, event, hashlib.sha256).digest(), seconds=secs,
        max_ops=10_000_000)
    counter = {"n": 0}

    def anchor() -> None:  # what AuditJournal._anchor does after each state change
        counter["n"] += 1
        hsm.raise_counter("bench/ceiling/anchor", counter["n"])

    out["hsm_raise_counter"] = _bounded_rate(anchor, seconds=secs, max_ops=200_000, chunk=8)
    hsm.close()

    db_path = settings.home_dir / "bench-commit.sqlite3"
    conn = sqlite3.connect(str(db_path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")

    def commit() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (v) VALUES (?)", (b"x" * 200,))
        conn.execute("COMMIT")

    out["sqlite_commit_fsync"] = _bounded_rate(commit, seconds=secs, max_ops=200_000, chunk=8)
    conn.close()
    return out


def _tenant(kms: Any, name: str, roles: tuple[str, ...]
            ) -> tuple[str, dict[str, Any], dict[str, str]]:
    """A tenant with a principal of each role: (id, callers, tokens) by role."""
    t = kms.tenants.create(name)
    tokens = {role: kms.principals.create(tenant_id=t.id, role=role,
                                          name=f"bench-{role}").token for role in roles}
    return t.id, {role: kms.principals.authenticate(tk) for role, tk in tokens.items()}, tokens


def _offboard_and_erase(kms: Any, clock: Any, tenant_id: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    kms.lifecycle.serve_notice(tenant_id)
    t1 = time.perf_counter()
    clock.advance(PAST_DEADLINE)  # the clock moves past the deadline
    t2 = time.perf_counter()
    outcome = kms.erasure.erase(tenant_id)
    t3 = time.perf_counter()
    if outcome.state != "erased":
        raise RuntimeError(f"erasure of {tenant_id} ended {outcome.state}: {outcome.error}")
    document, _signature = kms.erasure.certificate(tenant_id)
    cert = json.loads(document)
    return {"offboard_ms": (t1 - t0) * 1e3, "erase_ms": (t3 - t2) * 1e3,
            "destroyed_objects": len(cert["destroyed_objects"]),
            "deleted_rows": cert["deleted_rows"]}


def erasure(args: argparse.Namespace) -> dict[str, Any]:
    from kms.clock import FixedClock

    clock = FixedClock(datetime.now(timezone.utc))
    kms = _kms(clock)
    out: dict[str, Any] = {"volume_keys": [], "data_volume": []}
    deadline = time.monotonic() + args.max_seconds
    for n in args.sizes:
        tid, callers, _ = _tenant(kms, f"bench erasure {n} volumes", ("hypervisor",))
        hv = callers["hypervisor"]
        t0 = time.perf_counter()
        for i in range(n):
            if time.monotonic() > deadline:
                raise RuntimeError("erasure benchmark ran past its time bound")
            kms.volumes.create(hv, volume_id=f"vol-{i:05d}", cipher="aes-xts-plain64",
                               key_bits=512)
        created = time.perf_counter() - t0
        row = {"volumes": n, "create_seconds": created, **_offboard_and_erase(kms, clock, tid)}
        print(json.dumps({"progress": row}), file=sys.stderr, flush=True)
        out["volume_keys"].append(row)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(1 << 20)
    for mib in args.data_mib:
        tid, callers, _ = _tenant(kms, f"bench erasure {mib} MiB", ("tenant-admin", "app"))
        kms.appkeys.create(callers["tenant-admin"], name="data", key_type="aes256-gcm")
        path = work / f"data-{mib}MiB.kms"
        t0 = time.perf_counter()
        with open(path, "w") as fh:  # the data the tenant's key protects
            for _ in range(mib):
                if time.monotonic() > deadline:
                    raise RuntimeError("erasure benchmark ran past its time bound")
                ciphertext, _v = kms.transit.encrypt(callers["app"], "data", chunk)
                fh.write(ciphertext + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        encrypted = time.perf_counter() - t0
        size = path.stat().st_size
        row = {"data_mib": mib, "ciphertext_bytes": size, "encrypt_seconds": encrypted,
               **_offboard_and_erase(kms, clock, tid)}
        # The alternative to crypto-erasure: overwrite the same bytes once (the cheapest
        # overwrite there is: one pass of zeros, then fsync).
        t0 = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M",
                        f"count={(size + (1 << 20) - 1) >> 20}", "conv=notrunc,fsync",
                        "status=none"], check=True, timeout=600)
        row["overwrite_ms"] = (time.perf_counter() - t0) * 1e3
        path.unlink()
        print(json.dumps({"progress": row}), file=sys.stderr, flush=True)
        out["data_volume"].append(row)
    kms.close()
    return out


def populate(args: argparse.Namespace) -> dict[str, Any]:
    """N tenants through the service (each with its KEK in the token); the first K get
    a principal of each role, for the server to be exercised across tenants. Then
    `--probe` more tenants, timed, with the service exactly as it is.

    `--fast-setup` skips, during the bulk set-up only, the anchoring of the journal head
    in the token after each change (`AuditJournal._anchor`): SoftHSM answers its templated
    search by walking every object, so with it each create costs O(tenants) and 10,000
    creates take well over ten minutes. The probe measures that cost."""
    kms = _kms()
    if args.fast_setup:
        setattr(kms.audit, "_anchor", lambda label, seq: None)  # noqa: B010
    active: list[dict[str, str]] = []
    deadline = time.monotonic() + args.max_seconds
    t0 = time.perf_counter()
    created = 0
    for i in range(args.tenants):
        if time.monotonic() > deadline:
            print(json.dumps({"progress": {"stopped_at_time_bound": i}}), file=sys.stderr)
            break
        t = kms.tenants.create(f"bench tenant {i:05d}")
        created += 1
        if i < args.active:
            row = {"id": t.id}
            for role in ("tenant-admin", "app", "hypervisor"):
                row[role] = kms.principals.create(tenant_id=t.id, role=role,
                                                  name=f"bench-{role}").token
            active.append(row)
        if i and i % 2000 == 0:
            print(json.dumps({"progress": {"tenants": i,
                                           "seconds": time.perf_counter() - t0}}),
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    if args.fast_setup:
        delattr(kms.audit, "_anchor")  # the service as it is, anchors included
    probe_t0 = time.perf_counter()
    probed = 0
    for j in range(args.probe):
        if time.perf_counter() - probe_t0 > 120:
            break
        kms.tenants.create(f"bench probe {j:05d}")
        probed += 1
    probe_seconds = time.perf_counter() - probe_t0
    kms.close()
    return {"tenants": created + probed, "requested": args.tenants, "seconds": seconds,
            "fast_setup": args.fast_setup, "active": active, "probe": probed,
            "probe_rate": probed / probe_seconds if probe_seconds else None}


def erase_one(args: argparse.Namespace) -> dict[str, Any]:
    from kms.clock import FixedClock

    clock = FixedClock(datetime.now(timezone.utc))
    kms = _kms(clock)
    try:
        if not args.profile:
            return _offboard_and_erase(kms, clock, args.tenant)
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        out = _offboard_and_erase(kms, clock, args.tenant)
        profiler.disable()
        stats = pstats.Stats(profiler)
        top = []
        for (filename, _line, func), (_cc, ncalls, _tt, cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            if any(k in filename for k in ("/hsm/", "/kms/", "/pkcs11/")):
                where = "/".join(Path(filename).parts[-2:])
                top.append({"function": f"{where}:{func}", "calls": ncalls,
                            "cumulative_ms": cum * 1e3})
        top.sort(key=lambda r: -r["cumulative_ms"])
        out["profile"] = top[:15]
        return out
    finally:
        kms.close()


def floor(args: argparse.Namespace) -> dict[str, Any]:
    """What one data-plane request costs, piece by piece, on the server's core: the parts
    the service cannot do without, each called alone (the calling thread's CPU), and the
    layers of the ASGI application, driven in process without an HTTP server (process
    CPU, every thread: the journal's writer too). Set beside the HTTP figures, they say
    how much of a ratio target's budget is taken before any web code runs."""
    import asyncio
    import base64
    import gc

    from api.app import create_app
    from bench.asgi import measure
    from bench.bare import add_probe_routes, create_bare_app
    from kms.audit import AuditContext, audit_context
    from kms.config import load_settings

    secs = args.seconds
    kms = _kms()
    kms.self_test()
    tid, callers, tokens = _tenant(kms, f"bench floor {os.getpid()}",
                                   ("tenant-admin", "app", "hypervisor"))
    kms.appkeys.create(callers["tenant-admin"], name="k", key_type="aes256-gcm")
    kms.volumes.create(callers["hypervisor"], volume_id="vol-1", cipher="aes-xts-plain64",
                       key_bits=512)
    data = os.urandom(1024)
    out: dict[str, Any] = {"alone": {}, "journal": {}, "asgi": {}}
    alone = out["alone"]
    with audit_context(AuditContext(source="127.0.0.1", actor="bench")):
        alone["authenticate"] = _bounded_rate(
            lambda: kms.principals.authenticate(tokens["app"]), seconds=secs,
            max_ops=200_000)
        kms.audit_batcher.enabled = False  # the operation alone; its journal event below
        try:
            alone["encrypt"] = _bounded_rate(
                lambda: kms.transit.encrypt(callers["app"], "k", data), seconds=secs,
                max_ops=200_000)
            alone["keyfetch"] = _bounded_rate(
                lambda: kms.volumes.fetch_key(callers["hypervisor"], "vol-1"),
                seconds=secs, max_ops=200_000)
        finally:
            kms.audit_batcher.enabled = True
        # The journal's writer, as the group commit calls it: one transaction of n events.
        for n in (1, 8, 16, 64):
            def batch(n: int = n) -> None:
                kms.audit.append_direct(kms.db, [kms.audit.pending(
                    action="key.encrypt", tenant_id=tid, object="key:k:v1",
                    actor=callers["app"].actor) for _ in range(n)])
            r = _bounded_rate(batch, seconds=secs, max_ops=20_000, chunk=4)
            r["cpu_us_per_event"] = r["cpu_us"] / n
            out["journal"][str(n)] = r

    # The layers, in process (bench/asgi.py's driver): the bare app; the service's app
    # answering the bare route's constant from a route of its own (its middleware,
    # exception handlers and routing table, nothing else); that route authenticating
    # through the service's inline call; encrypt with the journal off, and on.
    settings = load_settings(None)
    app = create_app(settings, kms)
    add_probe_routes(app)
    bare = create_bare_app()
    body = json.dumps({"plaintext": base64.b64encode(data).decode()}).encode()
    layers = [("bare", bare, "/v1/keys/k/encrypt", "x", body, True),
              ("service_noop", app, "/v1/bench-noop/k/encrypt", "x", body, True),
              ("service_auth", app, "/v1/bench-auth/k/encrypt", tokens["app"], body, True),
              ("encrypt_audit_off", app, "/v1/keys/k/encrypt", tokens["app"], body, False),
              ("encrypt", app, "/v1/keys/k/encrypt", tokens["app"], body, True),
              ("keyfetch_audit_off", app, "/v1/volumes/vol-1/key", tokens["hypervisor"],
               b"", False),
              ("keyfetch", app, "/v1/volumes/vol-1/key", tokens["hypervisor"], b"", True)]
    n = max(300, min(3000, int(3000 * secs / 2)))

    async def run() -> None:
        for name, a, path, token, b, journal in layers:
            batcher = kms.audit_batcher
            batcher.enabled = journal
            commits0, events0 = batcher.commits, batcher.committed_events
            cpu, _rate = await measure(a, path, token, b, n=n, conc=16, rounds=5)
            commits = batcher.commits - commits0
            out["asgi"][name] = {"cpu_us": cpu, "requests": n, "rounds": 5,
                                 "concurrency": 16,
                                 "events_per_commit": (batcher.committed_events - events0)
                                 / commits if commits else None}
        kms.audit_batcher.enabled = True

    gc.collect()
    gc.freeze()
    asyncio.run(run())
    kms.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ceilings")
    p.add_argument("--seconds", type=float, default=2.0)
    p = sub.add_parser("erasure")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[10, 1000, 10000])
    p.add_argument("--data-mib", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 64, 1024])
    p.add_argument("--work-dir", required=True)
    p.add_argument("--max-seconds", type=float, default=600)
    p = sub.add_parser("populate")
    p.add_argument("--tenants", type=int, default=10_000)
    p.add_argument("--active", type=int, default=100)
    p.add_argument("--probe", type=int, default=0)
    p.add_argument("--fast-setup", action="store_true")
    p.add_argument("--max-seconds", type=float, default=600)
    p = sub.add_parser("erase-one")
    p.add_argument("--tenant", required=True)
    p.add_argument("--profile", action="store_true", help="run under cProfile")
    p = sub.add_parser("floor")
    p.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    if not os.environ.get("KMS_HOME"):
        raise SystemExit("KMS_HOME must name a throwaway bench home")
    fn = {"ceilings": ceilings, "erasure": erasure, "populate": populate,
          "erase-one": erase_one, "floor": floor}[args.cmd]
    print(json.dumps(fn(args)))


if __name__ == "__main__":
    main()
