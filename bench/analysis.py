"""The written conclusions of BENCHMARKS.md, with this run's figures filled in.

The reasoning was written from the profiles of the runs made while building the bench
(December 2026, commit c2c9148 and its neighbours); the figures are recomputed on every
run, so that a change in the service shows up in the numbers at once. When a fix lands,
re-read the profile section of BENCHMARKS.md before trusting a sentence here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bench.report import agg


def _r(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "?"
    return f"{x:,.{digits}f}"


def _p(x: float | None) -> str:
    return "?" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


class _Ctx:
    def __init__(self, res: dict[str, Any]):
        self.res = res
        self.http = res.get("http", {})
        self.prof = res.get("profiles", {})

    def a(self, key: str, c: int) -> dict[str, float] | None:
        return agg(self.http.get(key), c)

    def rate(self, key: str, c: int) -> float | None:
        a = self.a(key, c)
        return a["rate"] if a else None

    def cpu_ms(self, key: str, c: int) -> float | None:
        """Server CPU time per request (ms): server CPU share / request rate."""
        a = self.a(key, c)
        if not a or not a["rate"]:
            return None
        unit = float(self.http[key].get("unit", 1))
        return float(a["server_cpu"]) / (float(a["rate"]) / unit) * 1e3

    def ratio(self, key: str, base: str, c: int) -> float | None:
        x, y = self.rate(key, c), self.rate(base, c)
        return x / y if x and y else None

    def cpu_range(self) -> str:
        vals = [r["server_cpu"] for k in ("encrypt", "keyfetch", "decrypt", "datakey")
                for c, runs in (self.http.get(k) or {}).get("runs", {}).items()
                if int(c) >= 16 for r in runs]
        return f"{min(vals):.0%}–{max(vals):.0%}" if vals else "?"

    def sqlite_commit_ms(self) -> float | None:
        c = (self.res.get("ceilings") or {}).get("sqlite_commit_fsync")
        return c["p50_us"] / 1000 if c else None

    def category(self, prof_key: str, needle: str) -> float | None:
        p = self.prof.get(prof_key) or {}
        return next((v for k, v in p.get("categories", []) if needle in k), 0.0) \
            if p.get("categories") else None

    def own(self, prof_key: str, needle: str) -> float | None:
        p = self.prof.get(prof_key) or {}
        return next((v for k, v in p.get("own_inclusive", []) if needle in k), 0.0) \
            if p.get("own_inclusive") else None


def _summary(x: _Ctx, table: Any) -> str:
    met = [v for v in table.verdicts if v[1] == "met"]
    missed = [v for v in table.verdicts if v[1] != "met"]
    large = (x.res.get("memory") or {}).get("large") or {}
    one = (large.get("erase_one") or {}).get("erase_ms")
    token_note = ""
    if one is not None:
        token_note = (f" In a token that holds {large.get('tenants', 0):,} tenants, one "
                      f"erasure took {one / 1000:.1f} s"
                      + (", over the 2 s target," if one >= 2000 else "")
                      + " because the token is scanned object by object (section 7).")
    return (f"**{len(met)} targets met, {len(missed)} missed.** Erasure meets its targets "
            "for the tenant sizes asked, in a token holding few other tenants, and is flat in "
            f"the amount of data protected.{token_note} The HTTP data plane misses every "
            "throughput target by a wide margin, and the service trails the PyKMIP peer on "
            "the operations both offer while its audit journal is on. The profiles agree on "
            "why: the time goes to the web framework's thread hand-offs, to SQLAlchemy ORM "
            "reads and to the audit journal's writer, not to cryptography (AES-GCM of 1 KiB "
            "costs about 1 µs in process, a SoftHSM unwrap tens of µs, and only on a key-cache "
            "miss).")


def _data_plane(x: _Ctx) -> str:
    c = 16
    bare, enc, kf = x.rate("bare", c), x.rate("encrypt", c), x.rate("keyfetch", c)
    deps, asyn = x.ratio("bare-deps", "bare", c), x.ratio("bare-async", "bare", c)
    enc_off, kf_off = x.rate("encrypt-noaudit", c), x.rate("keyfetch-noaudit", c)
    sql = x.category("encrypt-gil", "SQLAlchemy")
    hand = x.category("encrypt-gil", "thread hand-offs")
    fw = (x.category("encrypt-gil", "FastAPI") or 0) + (x.category("encrypt-gil", "uvicorn")
                                                          or 0)
    token = x.category("encrypt-gil", "PKCS#11")
    crypto = x.category("encrypt-gil", "AES-GCM")
    batcher = x.own("encrypt-gil", "AuditBatcher._run")
    auth = x.own("encrypt-gil", "PrincipalService.authenticate")
    reserve = x.own("encrypt-gil", "TransitService._reserve")
    sql_off = x.category("encrypt-noaudit-gil", "SQLAlchemy")
    title = "Encrypt, decrypt, data keys and volume key fetch against the bare endpoint"
    cpu_b, cpu_e = _r(x.cpu_ms("bare", c), 2), _r(x.cpu_ms("encrypt", c), 2)
    cpu_k = _r(x.cpu_ms("keyfetch", c), 2)
    hmac = (x.res.get("ceilings") or {}).get("hsm_hmac_sha256")
    hmac_us = _r(1e6 / hmac["rate"], 0) if hmac else "?"
    gain = 1 / max(0.05, 1 - ((sql or 0) + (hand or 0)) / 100)
    reach = _p((x.ratio("encrypt", "bare", c) or 0) * gain)
    return f"""### 1. {title} (missed)

At concurrency 16 the bare endpoint answers {_r(bare)} req/s; encrypt answers {_r(enc)}
({_p(x.ratio('encrypt', 'bare', c))}, target 70%) and volume key fetch {_r(kf)}
({_p(x.ratio('keyfetch', 'bare', c))}, target 60%). The server process is CPU-bound
({x.cpu_range()} of its core in the runs at c=16 and 64), so throughput is the inverse of
the CPU a request costs: about {cpu_b} ms for the bare endpoint, {cpu_e} ms for encrypt,
{cpu_k} ms for a key fetch. The GIL profile of encrypt puts
{_r(sql, 0)}% of the samples in SQLAlchemy/SQLite, {_r(hand, 0)}% in thread hand-offs,
{_r(fw, 0)}% in FastAPI/Starlette/uvicorn, {_r(token, 0)}% in the token and {_r(crypto, 0)}% in
AES-GCM and base64. By function: the audit writer thread
(`AuditBatcher._run`) {_r(batcher, 0)}%, authentication
(`PrincipalService.authenticate`) {_r(auth, 0)}%, key lookup and usage reservation
(`TransitService._reserve`) {_r(reserve, 0)}%. Three causes, three fixes:

- **Thread hand-offs.** FastAPI runs a sync dependency, a sync endpoint and, for a sync
  endpoint, the response validation each in the thread pool: one hop each. `api/deps.py`
  is async already; `api/tenant_routes.py:authenticate` is sync (it reads the database), so
  an encrypt takes three hops where an async route takes none. Measured on the same stack:
  the bare endpoint with the service's dependency shape doing nothing runs at {_p(deps)}
  of the bare endpoint, and an async route without any hop at {_p(asyn)}. Fix: call
  `kms.principals.authenticate` inside the route, in the same thread as the service call
  (one hop fewer); better, make the routes `async def`, run authentication and the service
  call together in one `anyio.to_thread.run_sync`, and return a `JSONResponse` directly
  (no response-model validation hop).
- **Two ORM read transactions per request.** `kms/principals.py:PrincipalService.authenticate`
  (principal, tenant) and then `kms/transit.py:TransitService._reserve` / `_opener`
  (tenant, key, key version) or `kms/volumes.py:VolumeService.fetch_key` (tenant, volume,
  KEK) each open a `Database.read()` session, send BEGIN, load ORM objects and commit.
  With the journal off, SQLAlchemy/SQLite still takes {_r(sql_off, 0)}% of the encrypt
  profile. Fix: one read session per request (authenticate inside the service call),
  Core `select()` rows instead of ORM objects on the hot path, and an in-process cache of
  token digest → (principal, tenant, role) and of key metadata, validated by the tenant's
  `epoch` (already read for authentication and bumped on every state change, which is
  exactly when cached entries must die; revocation would bump it too).
- **The audit journal.** With data-plane events off, encrypt rises to {_r(enc_off)} req/s
  and key fetch to {_r(kf_off)} req/s at c=16: the journal costs
  {_p(1 - enc / enc_off if enc and enc_off else float('nan'))} and
  {_p(1 - kf / kf_off if kf and kf_off else float('nan'))} of throughput there, and about
  {_p(1 - (x.rate('encrypt', 1) or 0) / (x.rate('encrypt-noaudit', 1) or float('nan')))} at
  c=1, where each request waits for its own group commit. `kms/audit.py:AuditJournal.append`,
  run by `kms/audit_batch.py:AuditBatcher._run`, builds one ORM object per event, computes
  an HMAC per event and one for the head in the token, flushes, commits with fsync
  (synchronous=FULL) and anchors the head in the token at most once a second. Fix: insert
  a batch with one Core `insert(AuditEvent)` executemany and update the head with one Core
  `update`; the HMACs themselves are cheap (one token HMAC: {hmac_us} µs, see the ceilings).

What is within reach: 70% of the bare endpoint leaves about
{_r((x.cpu_ms('bare', c) or 0) * (1 / 0.7 - 1), 2)} ms of CPU per request on top of the stack for
authentication, key lookup, AES-GCM and the journal — less than one ORM query with its
transaction. The profile bounds what the three fixes can give: taking out most of the
SQLAlchemy and hand-off shares ({_r((sql or 0) + (hand or 0), 0)}% together) is worth at most about
{_r(gain, 1)}×, i.e. encrypt near {reach} of today's bare ceiling. Reaching 70% also needs
the stack's own per-request cost down: async routes
(the async bare route runs at {_p(asyn)} of the sync one) with the service's blocking work in
one hop, no ORM on the hot path (cached authentication and key metadata) and a Core
journal. At c=1 the target is out of reach by design: no key leaves before its journal
event is durably committed, and that fsync'd commit
(p50 {_r(x.sqlite_commit_ms(), 2)} ms here, see the ceilings) plus the hand-off to the writer
thread sit on every request's path, against a bare round trip of
{_r(1000 / (x.rate('bare', 1) or float('nan')), 2)} ms."""


def _batch(x: _Ctx) -> str:
    rates = {c: x.rate("batch", c) for c in (1, 16, 64)}
    best_c = max((c for c in rates if rates[c]), key=lambda c: rates[c] or 0, default=1)
    fw = x.category("batch-gil", "FastAPI")
    pyd = x.category("batch-gil", "pydantic")
    crypto = x.category("batch-gil", "AES-GCM")
    b64 = x.own("batch-gil", "_b64")
    return f"""### 2. Batch encrypt (missed)

Best: {_r(rates.get(best_c))} items/s at concurrency {best_c} (target 50,000); it does not grow
with concurrency ({_r(rates.get(1))} / {_r(rates.get(16))} / {_r(rates.get(64))} items/s at
1 / 16 / 64): one core parses, encrypts and answers 1.4 MB bodies, and more of them at once
only add GIL contention and memory. Profile (c=16): FastAPI/Starlette/json
{_r(fw, 0)}%, pydantic {_r(pyd, 0)}%, base64 and AES-GCM {_r(crypto, 0)}% (of which
`api/tenant_routes.py:_b64`, one call per item, {_r(b64, 0)}%). AES-GCM itself is about 1 µs per
item; the rest is per-item Python. Fix, all in `api/tenant_routes.py:encrypt` and
`kms/transit.py:_seal_all`: validate the batch in one pass from the raw bytes
(`TypeAdapter(...).validate_json` on the body instead of `json.loads` then 1,000 pydantic
models), decode with `binascii.a2b_base64(data, strict_mode=True)`, return a
`JSONResponse` built by one `json.dumps` (a route that returns a `dict` has FastAPI
validate and serialise all 1,000 results through its response field), and build the AAD
prefix once per batch. 50,000 items/s is 20 µs per item all-in: AES-GCM, base64 both ways
and JSON fit in that on this core, so the target is reachable; and batch requests should be
admitted a few at a time (a semaphore) rather than 64 at once."""


def _peer(x: _Ctx) -> str:
    peer = x.res.get("peer")
    if not peer:
        return "### 3. PyKMIP\n\nNot measured in this run (see Notes)."
    rows = {(r["system"], r["op"], r["concurrency"]): r for r in peer["results"]}

    def ratio(system: str, op: str, c: int) -> str:
        a, b = rows.get((system, op, c)), rows.get(("pykmip", op, c))
        return f"{a['rate'] / b['rate']:.2f}×" if a and b and b["rate"] else "?"

    cs = sorted({k[2] for k in rows})

    def ahead(system: str, op: str) -> bool:
        pairs = [(rows.get((system, op, c)), rows.get(("pykmip", op, c))) for c in cs]
        return all(a and b and a["rate"] >= b["rate"] for a, b in pairs)

    on_ahead = [op for op in ("create", "get", "encrypt") if ahead("ours", op)]
    anchor = (x.res.get("ceilings") or {}).get("hsm_raise_counter")
    anchor_ms = _r(1e3 / anchor["rate"], 1) if anchor else "?"
    off_ahead = [op for op in ("get", "encrypt") if ahead("ours-noaudit", op)]
    off_sentence = (f"With data-plane events off, ours is ahead on "
                    f"{' and '.join(off_ahead) if off_ahead else 'neither get nor encrypt'} "
                    "at every concurrency measured"
                    + (f"; with them on, ahead on {' and '.join(on_ahead)} only."
                       if on_ahead else "; with them on, on none.")
                    + " Our client-side CPU is lower than PyKMIP's (JSON over HTTP vs "
                    "KMIP's TTLV encoding), so the harness does not favour PyKMIP.")
    lines = []
    for op in ("create", "get", "encrypt"):
        lines.append(f"| {op} | " + " | ".join(
            f"{ratio('ours', op, c)} / {ratio('ours-noaudit', op, c)}" for c in cs) + " |")
    head = "| operation | " + " | ".join(f"c={c}: audit on / off" for c in cs) + " |"
    return f"""### 3. Against PyKMIP (missed where the journal is on)

Ours ÷ PyKMIP, same Python client harness, both over TLS:

{head}
|---|{'---|' * len(cs)}
{chr(10).join(lines)}

PyKMIP records nothing durable for Get or Encrypt: no audit event, no HMAC, no fsync (its
log is a text file, left at WARNING here), so the comparison charges our journal against
nothing. {off_sentence} The fixes of section 1 are what closes the gap. Create writes on
both sides; ours also appends an audit event in the same transaction and anchors the
journal head in the token
after each state change (`kms/audit.py:AuditJournal.record` with `anchor_now=True` →
`_anchor` → `hsm/adapter.py:Pkcs11Hsm.raise_counter`, which creates one token object and
destroys the previous one: {anchor_ms} ms each in a small token, see the ceilings).
Batching those anchors as the data plane does (at most one a second) would take that cost
out of every create, and section 4 explains the long tail of creates under concurrency."""


def _volcreate(x: _Ctx) -> str:
    wall = x.prof.get("volcreate-wall") or {}
    begin = x.own("volcreate-wall", "_on_begin")
    a16, a64 = x.a("volcreate", 16), x.a("volcreate", 64)
    p99_16 = _r(a16["p99"] if a16 else None)
    p99_64 = _r(a64["p99"] if a64 else None)
    p50_16 = _r(a16["p50"] if a16 else None, 1)
    return f"""### 4. Volume create: throughput flat, tail latency in seconds

Volume create stays near {_r(x.rate('volcreate', 1))} req/s from c=1 to c=64, but its p99 reaches
{p99_16} ms at c=16 and {p99_64} ms at c=64 (p50 {p50_16} ms at c=16).
The wall-clock profile of the threads serving `create_volume` ({wall.get('samples', '?')} samples)
finds them {_r(begin, 0)}% of the time inside `BEGIN IMMEDIATE`
(`kms/db.py:_configure_sqlite._on_begin`), i.e. in SQLite's busy handler: writers of the
same process compete for the database write lock and SQLite makes the losers sleep with a
growing back-off (up to 100 ms per retry) instead of queueing them, so some requests wait
seconds while others pass. Fix: in `kms/db.py:Database.write`, take a process-wide
`threading.Lock` before `BEGIN IMMEDIATE` (SQLite admits one writer at a time anyway), so
in-process writers queue in order and wake at the previous commit; the busy timeout then
only arbitrates between processes."""


def _workers(x: _Ctx) -> str:
    w = x.res.get("workers") or {}
    if not w:
        return "### 5. Processes\n\nNot measured in this run."

    def rate(op: str, name: str, c: int) -> float | None:
        r = w.get(f"{op}|{name}|{c}")
        return r["requests"] / r["seconds"] if r and r["seconds"] else None

    one, one_u = "1 process on CPU 0", "1 process, unpinned"
    two_u, two_p = "2 processes, unpinned", "2 processes, one per core"
    e = {n: rate("encrypt", n, 64) for n in (one, one_u, two_u, two_p)}
    k = {n: rate("keyfetch", n, 64) for n in (one, one_u, two_u, two_p)}
    b = {n: rate("bare", n, 64) for n in (one, one_u, two_u, two_p)}
    p99 = {n: (w.get(f"encrypt|{n}|64") or {}).get("p99_ms") for n in (one, two_p)}
    kf = " / ".join(_r(k[n]) for n in (one, one_u, two_u, two_p))
    gain_b = (b[two_p] or 0) / (b[one] or float("nan"))
    gain_e = (e[two_p] or 0) / (e[one] or float("nan"))
    gain_k = (k[two_p] or 0) / (k[one] or float("nan"))
    if gain_e >= 1.5:
        verdict = (f"Two processes, each pinned to its own core, are the best setup here "
                   f"({gain_e:.2f}× on encrypt).")
    else:
        verdict = (f"Two pinned processes raise the stack's ceiling {gain_b:.2f}× (bare "
                   f"endpoint) but give only {gain_e:.2f}× on encrypt and {gain_k:.2f}× on key "
                   f"fetch, with encrypt's p99 at {_r(p99[two_p])} ms against "
                   f"{_r(p99[one])} ms for one process: the processes' journal writers and "
                   "usage reservations meet on SQLite's write lock, where the loser sleeps in "
                   "the busy handler (section 4), and possibly on SoftHSM's cross-process "
                   "object-store locking.")
    return f"""### 5. How many processes

At c=64, encrypt: {_r(e[one])} req/s with one process pinned to a core, {_r(e[one_u])} unpinned,
{_r(e[two_u])} with two processes unpinned and {_r(e[two_p])} with two processes each pinned to its
own core (key fetch: {kf}; bare endpoint: {_r(b[one])} / {_r(b[one_u])} / {_r(b[two_u])} /
{_r(b[two_p])}); wrk shares the two cores in all four. An unpinned single process is slower
than a pinned one, most likely because its thread-pool threads, the journal writer and the
event loop then hand the GIL to each other across cores. {verdict}

Recommendation: one `kms serve` process per core, each pinned to its core
(`taskset -c N`); never several unpinned. The data-plane gain of the second process varies
from run to run on SQLite (between about 1.1× and 2.1× on encrypt in the runs made while
building this bench, with p99 up to seconds in the bad runs): the processes' writers meet
on SQLite's write lock, whose busy handler sleeps (section 4). Fix that before counting on
the second process. In production, with
PostgreSQL (row locks that queue instead of sleeping) and a network HSM, run one process per
core behind the load balancer. `kms serve` has no worker option today; one would bind the
sockets once, fork N children (SO_REUSEPORT) and rely on the PKCS#11 adapter's
re-initialisation after fork (`hsm/adapter.py` already checks the PID)."""


def _tls(x: _Ctx) -> str:
    c = 16
    return f"""### 6. TLS

On loopback the bare endpoint over TLS keeps {_p(x.ratio('bare-tls', 'bare', c))} of its plain-HTTP
throughput at c=16 and {_p(x.ratio('bare-tls', 'bare', 1))} at c=1 (connections are kept
alive: this is record encryption, not handshakes). The service is so much heavier than the
stack that TLS barely shows: encrypt over TLS runs at
{_p(x.ratio('encrypt-tls', 'encrypt', c))} of encrypt over
plain HTTP, key fetch at {_p(x.ratio('keyfetch-tls', 'keyfetch', c))}. The main rows use
`--insecure-http` (loopback only); TLS is the service's default."""


def _erasure(x: _Ctx) -> str:
    er = x.res.get("erasure") or {}
    vk = er.get("volume_keys", [])
    dv = er.get("data_volume", [])
    large = (x.res.get("memory") or {}).get("large") or {}
    one = large.get("erase_one") or {}
    prof = (large.get("erase_one_profiled") or {}).get("profile") or []
    token_fns = [r for r in prof if r["function"].startswith("hsm/")
                 and not r["function"].endswith((":_run", ":op"))]
    top = ", ".join(f"`{r['function']}` ({r['calls']:,} calls, {r['cumulative_ms']:,.0f} ms)"
                    for r in token_fns[:5])
    total = (large.get("erase_one_profiled") or {}).get("erase_ms")
    biggest = vk[-1] if vk else {}
    small_ms = vk[0]["erase_ms"] if vk else None
    big_verdict = "met" if biggest.get("erase_ms", 1e9) < 2000 else "missed"
    one_ms = one.get("erase_ms")
    one_verdict = "missed" if one_ms is None or one_ms >= 2000 else "under the 2 s target"
    lo = dv[0] if dv else {}
    hi = dv[-1] if dv else {}
    return f"""### 7. Erasure

A tenant with {_r(biggest.get('volumes'))} volume keys is erased in {_r(biggest.get('erase_ms'))} ms
(target < 2 s: {big_verdict}); 10 keys take {_r(small_ms)} ms. Erasure is constant in the
amount of data protected: a tenant whose key protects {_r(lo.get('data_mib'))} MiB is erased in
{_r(lo.get('erase_ms'))} ms, one whose key protects {_r(hi.get('data_mib'))} MiB in
{_r(hi.get('erase_ms'))} ms, while a
single pass of zeros over the same ciphertext takes {_r(lo.get('overwrite_ms'))} ms and
{_r(hi.get('overwrite_ms'))} ms — linear in size, and on a real multi-terabyte volume, hours.
Crypto-erasure touches only keys (the tenant's KEK generations and counters in the token)
and the tenant's rows; the ciphertext, wherever its copies are, becomes noise.

What does grow is the size of the *token*: erasing a tenant holding one key, in a token
holding {_r(large.get('tenants'))} tenants ({large.get('token_objects', '?')} objects), took
{_r(one_ms)} ms ({one_verdict}; {_r(small_ms)} ms in a small token). cProfile of a
second such erasure ({_r(total)} ms under the profiler), token functions by cumulative time:
{top or 'not available'}. `hsm/adapter.py:Pkcs11Hsm.destroy_by_label_prefix` and
`find_objects(label_prefix=...)` list every object of the token (`session.get_objects()`
with no template) and read CKA_LABEL of each, and they run three times (the destroy step,
its `_confirm_absent`, and `kms/erasure.py:ErasureRunner._verify_absent`). Each step also
anchors the audit head in the token (`raise_counter`: a templated search, which SoftHSM
answers by walking its objects, then a create and a destroy). Fix: find the tenant's
objects with exact templates — every label the tenant can own is derivable from the
database (`kms/<t>/kek/<n>`, `kms/<t>/ctr/appkey/<k>/v<n>`),
and PKCS#11 matches an exact CKA_LABEL or CKA_ID — and keep a single full label-prefix
scan, once, as the final proof of absence."""


def _memory(x: _Ctx) -> str:
    mem = x.res.get("memory") or {}
    s, l_ = mem.get("small") or {}, mem.get("large") or {}
    if not s or not l_:
        return "### 8. Memory\n\nNot measured in this run."
    extra = max(1, l_["tenants"] - s["tenants"])
    per_start = ((l_["rss_after_start_kib"] or 0) - (s["rss_after_start_kib"] or 0)) / extra
    start_s = _r((s["rss_after_start_kib"] or 0) / 1024, 1)
    start_l = _r((l_["rss_after_start_kib"] or 0) / 1024, 1)
    return f"""### 8. Memory

Right after start, before any request, `kms serve` holds {start_s} MiB
with {s['tenants']:,} tenants and {start_l} MiB with {l_['tenants']:,}:
about {_r(per_start, 1)} KiB per tenant. The service itself loads nothing per tenant at start;
this is most likely SoftHSM's in-memory copy of the token's objects (one KEK per tenant,
{l_.get('token_objects', '?')} objects here). After the same requests the peak
(VmHWM) is {_r(s['hwm_kib'] / 1024, 1)} MiB and {_r(l_['hwm_kib'] / 1024, 1)} MiB
({s.get('exercised_tenants', '?')} tenants exercised in both). No target was set; at this
rate a million tenants would need roughly {_r(per_start * 1e6 / 2**20, 1)} GiB in every process that
opens the token, which is an argument for a network HSM at that scale."""


def _token_scaling(x: _Ctx) -> str:
    mem = x.res.get("memory") or {}
    s, l_ = mem.get("small") or {}, mem.get("large") or {}
    if not s or not l_:
        return "### 9. Scaling with the size of the token\n\nNot measured in this run."
    rs, rl = s.get("probe_rate"), l_.get("probe_rate")
    minutes = None
    if rs and rl and l_["tenants"] > s["tenants"]:
        # per-create time grows linearly with the objects in the token: t(n) = a + b n
        b = max(0.0, (1 / rl - 1 / rs) / (l_["tenants"] - s["tenants"]))
        a = max(0.0, 1 / rs - b * s["tenants"])
        minutes = (a * l_["tenants"] + b * l_["tenants"] ** 2 / 2) / 60
    return f"""### 9. Scaling with the size of the token

Every state change — tenant, principal, key or volume created, and each erasure step —
anchors the journal head in the token after its commit
(`kms/audit.py:AuditJournal.record` → `append(anchor_now=True)` → `_anchor` →
`hsm/adapter.py:Pkcs11Hsm.raise_counter`). `raise_counter` searches the token with a
template (class, label, application); SoftHSM answers a search by walking every object it
holds, so each state change costs time in proportion to the number of tenants. Measured
through the service as it is: {_r(rs, 1)} tenant creates/s with {s['tenants']:,} tenants in
the token, {_r(rl, 1)}/s with {l_['tenants']:,}; the same
{s.get('exercised_tenants', 0) * 7} requests across {s.get('exercised_tenants', '?')} tenants
(keys and volumes created, keys used) took {_r(s.get('exercise_seconds'), 1)} s against
{_r(l_.get('exercise_seconds'), 1)} s. Populating {l_['tenants']:,} tenants one by one through the
service would take on the order of {_r(minutes, 0)} minutes; the bench skips the anchors
during its bulk set-up only (`bench/inproc.py populate --fast-setup`) and measures them in
the probe. Fix: keep the handle of the current anchor object in the adapter (found once,
by exact template) so that raising it needs no search, or anchor state changes at most
once a second as the data plane already does; the same cure applies to the usage counters
(`read_counter`/`raise_counter` every 4,096 encryptions) and to the erasure scans of
section 7."""


def analysis(res: dict[str, Any], table: Any) -> str:
    x = _Ctx(res)
    parts: list[str] = []
    sections: list[Callable[[], str]] = [
        lambda: _summary(x, table), lambda: _data_plane(x), lambda: _batch(x),
        lambda: _peer(x), lambda: _volcreate(x), lambda: _workers(x), lambda: _tls(x),
        lambda: _erasure(x), lambda: _memory(x), lambda: _token_scaling(x)]
    for section in sections:
        try:
            parts.append(section())
        except Exception as exc:  # noqa: BLE001 - a partial run still gets its report
            parts.append(f"(a section could not be written: {type(exc).__name__}: {exc})")
    return "\n\n".join(parts)
