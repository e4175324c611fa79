"""The written conclusions of BENCHMARKS.md, with this run's figures filled in.

The reasoning was written from the profiles of the runs made on 2026-12-03 after the
data-plane rework (async routes run inline, plain DB-API on the hot path, group commit per
event-loop round); the figures are recomputed on every run, so that a change in the
service shows up in the numbers at once. When a fix lands, re-read the profile section of
BENCHMARKS.md before trusting a sentence here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bench.report import agg, paired_ratio


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
        return paired_ratio(self.http, key, base, c)

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
        token_note = (f" In a token holding {large.get('tenants', 0):,} tenants, erasing one "
                      f"took {one / 1000:.1f} s"
                      + (" (over 2 s: PKCS#11 has no prefix search, so the erasure reads "
                         "every object's label twice, and SoftHSM's file store reads each "
                         "attribute from disk; section 7)." if one >= 2000 else "."))
    return (f"**{len(met)} targets met, {len(missed)} missed.** Erasure meets its targets and "
            f"is flat in the amount of data protected.{token_note} Against PyKMIP the service "
            "is ahead on every shared operation, journal on. Over HTTP, "
            + _ratio_summary(x) + " At concurrency 1 every request waits for its own "
            "fsync'd journal commit (by design: no key leaves before its event is durable). "
            "At 16 and 64, " + _floor_summary(x) + " (section 1).")


def _ratio_summary(x: _Ctx) -> str:
    """Which ratio targets hold at c=16 and 64, and whether a miss is the journal's."""
    parts = []
    for key, name, target in (("encrypt", "encrypt", 0.7), ("keyfetch", "key fetch", 0.6)):
        missed = [c for c in (16, 64) if (x.ratio(key, "bare", c) or 0) < target]
        if not missed:
            parts.append(f"{name} meets its target at 16 and 64")
            continue
        offs = [x.ratio(f"{key}-noaudit", "bare", c) for c in missed]
        journal = all(o is not None and o >= target for o in offs)
        parts.append(
            f"{name} misses at c={', '.join(map(str, missed))} "
            f"({', '.join(_p(x.ratio(key, 'bare', c)) for c in missed)}; target "
            f"{target:.0%})" + (
                f", by the journal alone: with data-plane events off it reaches "
                f"{', '.join(_p(o) for o in offs)}" if journal else ""))
    return "; ".join(parts) + "."


def _floor_summary(x: _Ctx) -> str:
    _table, fl = _floor(x)
    facts = fl.get("facts") or {}
    parts = [f"{_p(f['floor'] / f['budget'])} of {name}'s budget (what comes on top costs "
             f"{_r((f['journal_rest'] + f['rest']) / f['left'], 1)}× what that leaves)"
             for name, f in (("encrypt", facts.get("encrypt")),
                             ("key fetch", facts.get("keyfetch")))
             if f and f["budget"] and f["left"] > 0]
    if not parts:
        return "what the service cannot do without already takes the budget"
    return ("what the service cannot do without (authentication, the operation, the "
            "journal writer's own work) takes " + " and ".join(parts) + "; what comes on "
            "top is the journal's cost beyond its own work and the rest of the request path")


def _changes(x: _Ctx) -> str:
    ceil = x.res.get("ceilings") or {}
    unwrap = (ceil.get("hsm_gcm_decrypt_64b") or {}).get("rate")
    aes = (ceil.get("aesgcm_encrypt_1k") or {}).get("rate")
    bare16 = x.rate("bare", 16)
    host = (f"Host: the SoftHSM unwrap ceiling is {_r(unwrap)} op/s in this run against "
            f"14,653 then, AES-GCM {_r(aes)} against 631,403 op/s, the bare endpoint at "
            f"c=16 {_r(bare16)} against 1,869 req/s; absolute figures move with the host "
            "(it was twice as fast at 12:05 as at 17:18), the ratios are what a run "
            "compares." if unwrap and aes else "")
    return f"""### 0. What changed since the run of 17:18 on 2026-12-04

That run (the last before this work) measured encrypt at 308 / 941 / 1,151 req/s
(c=1/16/64; 31% / 52% / 59% of bare), key fetch at 317 / 833 / 955 (28% / 48% / 53%),
batch encrypt at 35,549 / 41,577 / 31,057 items/s, on a host much slower than the run
before it. {host} A full run at 21:59, on this code before its last changes (a second
Authorization header refused, contexts in canonical base64, problem documents; on the
hot path only one more header lookup), measured encrypt at 65% / 72% of bare (c=16/64)
and key fetch at 76% / 88%: about the spread between two runs on this host.

- **A volume key cache.** Every key fetch unwrapped the volume key in the token (a
  SoftHSM operation, cache-cold between requests: section 1). A released key is now
  served again from memory for at most `KMS_VOLUME_KEY_CACHE_SECONDS` (60 s by default,
  0 disables; capacity `KMS_KEY_CACHE_SIZE`), keyed by the tenant's state epoch, the
  wrapped blob and the KEK, so that a suspend, an erasure, a KEK rotation or a volume
  deleted and created again under the same id never gets the old key; the volume's row
  is still read and its event journaled on every fetch. The row "volume key fetch" is
  now the cached path; "volume key fetch, cache off" is every fetch unwrapping in the
  token, as a first release does.
- **The web layer, attributed and cut** (in process, journal off, one core, CPU per
  encrypt): FastAPI 0.165 dispatches a router added with `include_router` through a
  nested branch that matched every request twice; the routes now sit on the app's own
  router (168 → 150 µs; a test holds the OpenAPI document to every route once).
  Answers and problems are written by `pydantic_core.to_json` instead of
  `JSONResponse`'s `json.dumps` (5.0 → 1.6 µs an answer, 150 → 144 µs per encrypt; a
  property test holds them to the same bytes). The two context variables a request sets
  are set and reset without `contextlib` (0.83 → 0.11 µs each).
- **FastAPI's request handling, bypassed for well-formed data-plane requests**: a route
  whose endpoint takes only string path parameters, at most one body model and the
  `Request` (encrypt, decrypt, rewrap, datakey, key fetch, volume delete) is called
  directly when its body is `application/json` that parses (duplicate keys refused) and
  that its model accepts; anything else goes to FastAPI's own handler on the same
  request, so every refusal stays FastAPI's (a property test holds both paths to the
  same answers over generated bodies and content types). In process, journal off:
  encrypt 119 → 80–88 µs of CPU, key fetch 86 → 57–62, the plain bare route 64–67. The
  row "bare, through the service's route class" measures the same saving on the bare
  route (section 1).
- **FastAPI's OpenTelemetry off** (`api.app.TELEMETRY_OFF`, in the bare app too): FastAPI
  0.165 reports spans, metrics and exception records with stack traces to any
  OpenTelemetry provider in the process, and adds exporters when
  `FASTAPI_OTEL_AUTO_CONFIGURE=true`; a KMS sends nothing out it has not chosen to (a
  test holds it). Its per-request provider check cost about 4 µs.
- **Batch encrypt**: one `os.urandom` call for a batch's nonces instead of one per item,
  an answer of one key version written in one join checked once over all items, items
  as named tuples rather than frozen dataclasses (0.61 → 0.33 µs each): 3–8% of a
  batch's CPU in process."""


def _fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares of y = a + b·n: (a, b)."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if not sxx:
        return None
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - b * mx, b


def _switches_per_request(x: _Ctx, key: str, c: int) -> float | None:
    runs = ((x.http.get(key) or {}).get("runs") or {})
    rs = runs.get(c) or runs.get(str(c)) or []
    vals = [r["extra"]["context_switches"] / r["requests"] for r in rs
            if r.get("requests") and "context_switches" in (r.get("extra") or {})]
    vals.sort()
    return vals[len(vals) // 2] if vals else None


def _floor(x: _Ctx) -> tuple[str, dict[str, Any]]:
    """The budget a ratio target leaves per request, and what of it the parts the service
    cannot do without already take (bench.inproc floor, same run)."""
    fl = x.res.get("floor") or {}
    alone, asgi, journal = fl.get("alone", {}), fl.get("asgi", {}), fl.get("journal", {})
    c = 16
    cpu_b = x.cpu_ms("bare", c)
    fit = _fit([(float(n), r["cpu_us"]) for n, r in journal.items()])
    if not fl or cpu_b is None or fit is None:
        return "", {}
    bare_us = cpu_b * 1e3

    def us(key: str) -> float | None:
        v = x.cpu_ms(key, c)
        return v * 1e3 if v is not None else None

    def get(d: dict[str, Any], k: str) -> float | None:
        return (d.get(k) or {}).get("cpu_us")

    auth = get(alone, "authenticate")
    rows, facts = [], {}
    for op, key, target, what in (("encrypt", "encrypt", 0.7, "encrypt 1 KiB"),
                                  ("keyfetch", "keyfetch", 0.6, "volume key fetch")):
        on, off, alone_op = us(key), us(f"{key}-noaudit"), get(alone, op)
        handoffs = us(f"{key}-handoffs")
        batch = (asgi.get(op) or {}).get("events_per_commit")
        if None in (on, off, alone_op, auth, batch):
            continue
        assert on is not None and off is not None and alone_op is not None
        assert auth is not None and batch is not None
        budget = bare_us * (1 / target - 1)
        writer = fit[0] / batch + fit[1]
        floor = auth + alone_op + writer
        journal_rest = on - off - writer
        # With the hand-offs-only server of the same run: what handing the events to the
        # writer costs (hand-offs − off), and what the writer's work costs over HTTP
        # beyond its cost alone in process (on − hand-offs − writer).
        hand = handoffs - off if handoffs is not None else float("nan")
        writer_http = on - handoffs - writer if handoffs is not None else float("nan")
        added = on - bare_us
        rest = added - floor - journal_rest
        facts[op] = {"budget": budget, "floor": floor, "journal": on - off, "writer": writer,
                     "journal_rest": journal_rest, "added": added, "rest": rest,
                     "left": budget - floor, "batch": batch, "handoffs": hand,
                     "writer_http": writer_http,
                     "switches_on": _switches_per_request(x, key, c),
                     "switches_off": _switches_per_request(x, f"{key}-noaudit", c)}
        rows.append((what, target, budget, auth, alone_op, writer, floor, journal_rest, rest,
                     added, hand, writer_http))
    if not rows:
        return "", {}
    lines = ["| µs of server CPU per request, c=16 | " +
             " | ".join(f"{r[0]} (target {r[1]:.0%})" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]

    def line(label: str, i: int, fmt: Callable[[float], str] = lambda v: _r(v)) -> None:
        lines.append(f"| {label} | " + " | ".join(fmt(r[i]) for r in rows) + " |")

    line("budget: what the target leaves above the bare endpoint "
         f"({_r(bare_us)} µs), bare × (1/target − 1)", 2)
    line("authentication, alone in process (one SQLite read, SHA-256, compare)", 3)
    line("the operation, alone in process, journal off (encrypt: lookup, usage count, "
         "AES-GCM; key fetch: lookup and the unwrap in the token)", 4)
    line("its journal event: the writer's own work, alone in process, at the batch size "
         "measured in process (" + " / ".join(f"{facts[k]['batch']:.1f}" for k in facts) +
         " events per commit)", 5)
    line("**floor: the three above**", 6, lambda v: f"**{_r(v)}**")
    line("the journal's other costs over HTTP (journal on − off − the writer's own work)", 7)
    line("&nbsp;&nbsp;of which handing the events over: wake-ups, futures, the writer thread "
         "(the hand-offs-only server − journal off)", 10)
    line("&nbsp;&nbsp;of which the writer's work over HTTP beyond its cost alone "
         "(journal on − the hand-offs-only server − the writer alone)", 11)
    line("the rest: web layer and everything else (measured − floor − the line above)", 8)
    line("measured over HTTP: what the service adds above the bare endpoint", 9)
    table = "\n".join(lines)

    def d(a: str, b: str) -> float | None:
        va, vb = get(asgi, a), get(asgi, b)
        return va - vb if va is not None and vb is not None else None

    ours = d("service_noop", "bare")
    inline = d("service_auth", "service_noop")
    inline_net = inline - auth if inline is not None and auth is not None else None
    layers = {"bare": get(asgi, "bare"), "ours": ours, "inline_net": inline_net,
              "journal_asgi": d("encrypt", "encrypt_audit_off"),
              "kf_journal_asgi": d("keyfetch", "keyfetch_audit_off"), "fit": fit,
              "per_event": {n: r.get("cpu_us_per_event") for n, r in journal.items()}}
    return table, {"facts": facts, "layers": layers}


def _data_plane(x: _Ctx) -> str:
    c = 16
    bare, enc, kf = x.rate("bare", c), x.rate("encrypt", c), x.rate("keyfetch", c)
    enc_off, kf_off = x.rate("encrypt-noaudit", c), x.rate("keyfetch-noaudit", c)
    sync = x.ratio("bare-sync", "bare", c)
    direct = x.ratio("bare-direct", "bare", c)
    enc_direct, kf_direct = x.ratio("encrypt", "bare-direct", c), \
        x.ratio("keyfetch", "bare-direct", c)
    enc_direct64 = x.ratio("encrypt", "bare-direct", 64)
    fw = (x.category("encrypt-gil", "FastAPI") or 0) + (x.category("encrypt-gil", "uvicorn")
                                                          or 0)
    service = x.category("encrypt-gil", "service code")
    writer = x.own("encrypt-gil", "AuditBatcher._run")
    ceil = x.res.get("ceilings") or {}
    hmac = ceil.get("hsm_hmac_sha256")
    hmac_us = _r(1e6 / hmac["rate"], 0) if hmac else "?"
    seg = ceil.get("hmac_sha256_segment")
    seg_us = _r(1e6 / seg["rate"], 1) if seg else "?"
    commit = ceil.get("sqlite_commit_fsync") or {}
    commit_cpu = _r(commit.get("cpu_us"), 0)
    unwrap = ceil.get("hsm_gcm_decrypt_64b") or {}
    kf_cold = x.rate("keyfetch-cold", c)
    kc16, kc64 = x.ratio("keyfetch-cold", "bare", c), x.ratio("keyfetch-cold", "bare", 64)
    cpu_cold, cpu_kf = x.cpu_ms("keyfetch-cold", c), x.cpu_ms("keyfetch", c)
    unwrap_http = (cpu_cold - cpu_kf) * 1e3 if cpu_cold is not None and cpu_kf is not None \
        else None
    r16, k16 = x.ratio("encrypt", "bare", c), x.ratio("keyfetch", "bare", c)
    off16, koff16 = x.ratio("encrypt-noaudit", "bare", c), x.ratio("keyfetch-noaudit", "bare", c)
    r64 = x.ratio("encrypt", "bare", 64)
    k64 = x.ratio("keyfetch", "bare", 64)
    vs_sync = (enc / (bare * sync)) if enc and bare and sync else None
    table, fl = _floor(x)
    facts, layers = fl.get("facts", {}), fl.get("layers", {})
    fe = facts.get("encrypt") or {}
    fk = facts.get("keyfetch") or {}
    floor_share = fe["floor"] / fe["budget"] if fe.get("budget") else None
    web_layer = (layers.get("ours") or 0) + max(layers.get("inline_net") or 0, 0) \
        if layers else None
    noop16, auth16 = x.ratio("probe-noop", "bare", c), x.ratio("probe-auth", "bare", c)
    fit = layers.get("fit")
    per_event = layers.get("per_event") or {}
    floor_text = ""
    if table:
        ours, inline_net = layers.get("ours"), layers.get("inline_net")
        web = (ours or 0) + max(inline_net or 0, 0)
        verdicts = []
        for op, name in (("encrypt", "Encrypt"), ("keyfetch", "Key fetch")):
            f = facts.get(op)
            if not f:
                continue
            share = f["floor"] / f["budget"] if f["budget"] else float("nan")
            if f["left"] <= 0:
                verdicts.append(
                    f"{name}: the floor alone is {_p(share)} of the budget: out of reach "
                    "while each request waits for its own durable journal event, whatever "
                    "the rest costs.")
                continue
            verdicts.append(
                f"{name}: the floor takes {_p(share)} of the budget and leaves "
                f"{_r(f['left'])} µs, for what costs "
                f"{_r(f['journal_rest'] + f['rest'])} µs now "
                f"({_r((f['journal_rest'] + f['rest']) / f['left'], 1)}×): the journal's other "
                f"costs ({_r(f['journal_rest'])} µs) and the rest ({_r(f['rest'])} µs), of "
                f"which the service's own web layer, measured in process, is {_r(web)} µs.")
        sw = [(facts[k]["switches_on"], facts[k]["switches_off"]) for k in facts
              if facts[k]["switches_on"] is not None and facts[k]["switches_off"] is not None]
        switches = (f" With the journal on, the server makes {_r(sw[0][0], 1)} context "
                    f"switches per encrypt (off: {_r(sw[0][1], 2)}): the writer thread and "
                    "the event loop hand the one core and the GIL to each other for every "
                    "commit." if sw else "")
        a, b = fit or (float("nan"), float("nan"))
        floor_text = f"""
The budget, and what the service cannot do without (`bench.inproc floor`, pinned to the
server's core in the same run; the journal's other costs are measured over HTTP):

{table}

{' '.join(verdicts)}
The journal's writer, called alone (`AuditJournal.append_direct`, one transaction of n
events), costs about {_r(a)} µs of CPU per commit plus {_r(b, 1)} µs per event (least
squares over n = {', '.join(per_event)}: per event
{' / '.join(_r(v, 0) for v in per_event.values())} µs); the commit is mostly the kernel's
share of the fsync ({commit_cpu} µs in the SQLite ceiling) and the head's HMAC in the
token. Over HTTP the journal costs {_r(facts.get('encrypt', {}).get('journal'))} µs per
encrypt and {_r(facts.get('keyfetch', {}).get('journal'))} µs per key fetch, in process
{_r(layers.get('journal_asgi'))} and {_r(layers.get('kf_journal_asgi'))} µs.{switches}
Committing on the event loop itself instead (no writer thread, the loop blocked for the
commit) was tried with `bench/quick.py` in an earlier session: 619 against 614 µs of CPU
per encrypt at c=16, 536 against 638 at c=64, in one run — no clear gain at 16, and the
loop then stops for every fsync.
"""
    return f"""### 1. Encrypt and volume key fetch against the bare endpoint

At concurrency 16 the bare endpoint (an async route parsing the same body) answers
{_r(bare)} req/s; encrypt answers {_r(enc)} ({_p(r16)}, target 70%) and key
fetch {_r(kf)} ({_p(k16)}, target 60%); at 64, {_p(r64)} and {_p(k64)}.
With data-plane journal events off: {_r(enc_off)} and {_r(kf_off)} req/s
({_p(off16)} and {_p(koff16)} of bare).
Against the same stack with a `def` route (one thread-pool hop, {_p(sync)} of the async
bare), encrypt is at {_p(vs_sync)}. The data plane's well-formed requests no longer go
through FastAPI's dependency resolution (section 0); the bare route does, as any plain
FastAPI route. Through the service's route class the bare route answers {_p(direct)} of
the plain one, and against that stricter ceiling encrypt is at {_p(enc_direct)} at c=16
({_p(enc_direct64)} at 64) and key fetch at {_p(kf_direct)}: the targets are read against
the plain route, the issue's "bare endpoint on the same server stack", and this line
says how much of the margin the route class gives.

The server is CPU-bound ({x.cpu_range()} of its core at c≥16), so throughput is the inverse
of CPU per request, and a ratio target is a budget of CPU per request. The GIL profile of
encrypt (c=16): web stack (FastAPI/Starlette/uvicorn/h11) {_r(fw, 0)}%, service code
{_r(service, 0)}%, the journal writer thread `AuditBatcher._run` {_r(writer, 0)}% of GIL
samples (section "Profiles").
{floor_text}
{_journal_verdict(x)}
What it would take, and why it is not done:

- **The journal, and what it costs the loop.** With the journal off, encrypt reaches
  {_p(off16)} of bare at c=16 and key fetch {_p(koff16)} (targets 70% and 60%); with it on,
  {_p(r16)} and {_p(k16)}. Each event is canonical JSON, an HMAC in process under its
  segment's key ({seg_us} µs; it was an HMAC in the token, {hmac_us} µs, see the ceilings)
  and a row; each batch is four statements, the head's HMAC in the token and one fsync'd
  commit. That work is in the floor above ({_p(floor_share)} of encrypt's budget with
  authentication and the operation). The server whose writer writes nothing splits the
  rest: handing the events over (wake-ups, futures, the writer thread beside the loop)
  costs {_r(fe.get('handoffs'))} µs per encrypt and {_r(fk.get('handoffs'))} µs per key
  fetch at c=16, and the writer's work costs {_r(fe.get('writer_http'))} and
  {_r(fk.get('writer_http'))} µs more over HTTP than alone in process (its SQLite pages,
  token session and Python objects leave the caches between two commits, and its batches
  are smaller). A writer process of its own, fed through a pipe, would save at most the
  hand-offs line, and adds a second token login and a process to supervise: not done.
  Done instead, measured in process: the writer's own work (canonical JSON written out
  for the event's fixed fields, rows built as tuples, one timestamp per commit, a SQLite
  connection of the writer's own instead of a pool checkout) came down by about a
  quarter per commit of 8 events. Waiting longer to fill batches (a 1–3 ms window, tried
  twice) lowered throughput, the core then idle; committing on the loop itself is not a
  clear gain (above). Answering before the event is durable is not on the list: no key
  leaves without its event.
- **Key fetch unwrapped in the token on every request: done, a cache.** A released
  volume key is now served again from memory for at most 60 s
  (`KMS_VOLUME_KEY_CACHE_SECONDS`; DESIGN.md allows such a cache, dropped when the tenant
  changes state; the volume's row is still read on every fetch, so the cache serves only
  what the database would release now). With the cache off (every fetch unwraps in the
  token, as a first release does) key fetch answers {_r(kf_cold)} req/s at c=16
  ({_p(kc16)} of bare; {_p(kc64)} at 64), against {_r(kf)} ({_p(k16)}) with it: the
  unwrap costs {_r(unwrap_http)} µs of server CPU per fetch over HTTP, against
  {_r(unwrap.get('cpu_us'))} µs in process (the SoftHSM ceiling: python-pkcs11 and
  SoftHSM's file store, which checks the token's files on disk at every operation, run
  cache-cold between requests). A first release is therefore bound by the token: out of
  reach with SoftHSM's file store; a network HSM answers an unwrap on its own hardware.
- **The rest** ({_r(fe.get('rest'))} µs per encrypt here) is mostly not the service's
  own web layer ({_r(web_layer)} µs in process: middleware, exception handlers, routing
  table, the inline call): the probe rows put the service's app answering the bare
  constant at {_p(noop16)} of bare and the same after authenticating at {_p(auth16)}.
  Attributed in process this session (cProfile of the route against the bare one, and
  the difference between variants): FastAPI's nested router branch matched every request
  twice (18 µs of an encrypt: fixed), its dependency resolution and content-type parsing
  about 35 µs (fixed: called directly, section 0), its OpenTelemetry check 4 µs (off),
  `JSONResponse` 5 µs an answer (fixed, 1.6 µs), `contextlib` around two context
  variables 1.4 µs (fixed); what remains is the key lookup, the usage count and base64
  in the route's body. Over HTTP the same code costs more than in process (its caches
  are cold between requests, as the token's and the writer's are). A compiled HTTP parser
  (`httptools`, `uvloop`) would make the bare endpoint faster too, and the ratio no
  easier.
- **Concurrency 1 is out of reach by design.** Every request waits for the fsync'd commit
  of its own journal event (p50 {_r(x.sqlite_commit_ms(), 2)} ms for an SQLite commit here, see
  the ceilings) plus two thread wake-ups, against a bare round trip of
  {_r(1000 / (x.rate('bare', 1) or float('nan')), 2)} ms. Relaxing that (SQLite
  `synchronous=NORMAL`, or answering before the commit) would lose events on a power cut."""


def _journal_verdict(x: _Ctx) -> str:
    """Where encrypt misses at c=16 or 64 with the journal on and meets with it off: why
    that is out of reach without giving up what the journal guarantees."""
    out = []
    for c in (16, 64):
        on, off = x.ratio("encrypt", "bare", c), x.ratio("encrypt-noaudit", "bare", c)
        if on is None or off is None or on >= 0.7 or off < 0.7:
            continue
        cpu_on, cpu_off = x.cpu_ms("encrypt", c), x.cpu_ms("encrypt-noaudit", c)
        cost = (cpu_on - cpu_off) * 1e3 if cpu_on is not None and cpu_off is not None \
            else None
        on64, off64 = x.rate("encrypt", 64), x.rate("encrypt-noaudit", 64)
        share64 = max(0.0, 1 - on64 / off64) if on64 and off64 else None
        out.append(
            f"**Encrypt at c={c} misses by the journal alone** ({_p(on)} with data-plane "
            f"events, {_p(off)} without; {_r(cost)} µs of server CPU per request). Every "
            "answer waits for its event's commit: an fsync'd SQLite transaction whose head "
            "is HMAC'd in the token (so that a leaked segment key cannot forge the journal's "
            "end, and a journaled operation needs the token to be there). That fixed cost "
            "per commit is shared by the events that arrived meanwhile: at 64 clients the "
            "commits fill and the journal costs "
            + (f"{_p(share64)} of throughput" if share64 is not None and share64 >= 0.01
               else "nothing measurable") + "; at 16 a commit "
            "holds a few events (7.3 on average over HTTP in an earlier instrumented run), "
            "and its share per request is more than the margin the rest of the path "
            f"leaves ({_p(off)} against 70%). Taking it down means answering before the "
            "event is durable, MAC'ing the head in process, or `synchronous=NORMAL`, each "
            "of which gives up a property the journal exists for; or taking the same "
            "margin from the rest of the path, which this session already cut to what "
            "authentication, the key's lookup, the cipher and the HTTP server need "
            "(section 0). So: out of reach at this concurrency with a durable, token-anchored "
            "event per request, on this stack.\n")
    return "\n".join(out)


def _batch(x: _Ctx) -> str:
    rates = {c: x.rate("batch", c) for c in (1, 16, 64)}
    ok = [c for c in rates if (rates[c] or 0) >= 50_000]
    crypto = x.category("batch-gil", "AES-GCM")
    aes_rate = ((x.res.get("ceilings") or {}).get("aesgcm_encrypt_1k") or {}).get("rate")
    fw = x.category("batch-gil", "FastAPI")
    verdict = "met at every concurrency" if len(ok) == 3 else (
        f"met at c={', '.join(map(str, ok))}" if ok else "missed")
    slow = "" if len(ok) == 3 else (
        " The run of 12:05 on 2026-12-04, on a faster host, measured 64,572 / "
        "50,933 / 52,101 items/s, the run of 17:18 35,549 / 41,577 / 31,057; the batch "
        "path has only become cheaper since (section 0).")
    return f"""### 2. Batch encrypt ({verdict})

{_r(rates.get(1))} / {_r(rates.get(16))} / {_r(rates.get(64))} items/s at concurrency 1 / 16 / 64
(target 50,000). One core parses, encrypts and answers 1.4 MB bodies; concurrency adds
nothing but queueing. The GIL profile: base64, AES-GCM and hashing {_r(crypto, 0)}%,
FastAPI/Starlette/json {_r(fw, 0)}% (`json.loads` of the body and pydantic's validation of
1,000 items). Done: strict base64 through `pybase64` (SIMD; the standard library's
decoder and encoder were a third of a batch's CPU in the previous profile, 3.4× and 4×
slower in process), the AAD prefix built once per batch, the nonces drawn in one
`os.urandom` call, the answer written without `json.dumps` (in one join, its ciphertexts
checked once with `bytes.translate`, when all items have one key version), items as
named tuples. Left: parsing the body with one `pydantic_core` call from bytes. On a slow
or busy host the 50,000 items/s are near the edge: this is one core doing 1 KiB AES-GCM,
base64 both ways and JSON for every item (the AES-GCM ceiling in this run is
{_r(aes_rate)} op/s).{slow}"""


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
    behind = [op for op in ("create", "get", "encrypt") if op not in on_ahead]
    lines = []
    for op in ("create", "get", "encrypt"):
        lines.append(f"| {op} | " + " | ".join(
            f"{ratio('ours', op, c)} / {ratio('ours-noaudit', op, c)}" for c in cs) + " |")
    head = "| operation | " + " | ".join(f"c={c}: audit on / off" for c in cs) + " |"
    verdict = "met" if not behind else f"missed on {', '.join(behind)}"
    return f"""### 3. Against PyKMIP ({verdict})

Ours ÷ PyKMIP, same Python client harness, both over TLS:

{head}
|---|{'---|' * len(cs)}
{chr(10).join(lines)}

With the journal on, ours is ahead on {', '.join(on_ahead) if on_ahead else 'nothing'} at every
concurrency measured. PyKMIP records nothing durable for Get or Encrypt (no audit event,
no MAC, no fsync), so the comparison charges our journal against nothing. Create writes
on both sides; ours wraps the new key under the tenant's KEK in the token, counts the
KEK's use and appends its journal event in the same fsync'd transaction. Both clients are
the same Python harness; ours uses less client CPU than PyKMIP's (JSON over HTTP against
KMIP's TTLV), so the harness does not favour us."""


def _volcreate(x: _Ctx) -> str:
    a1, a16, a64 = x.a("volcreate", 1), x.a("volcreate", 16), x.a("volcreate", 64)
    rates = " / ".join(_r(x.rate("volcreate", c)) for c in (1, 16, 64))
    p99s = " / ".join(_r(a["p99"] if a else None, 1) for a in (a1, a16, a64))
    return f"""### 4. Volume create

{rates} req/s at c=1 / 16 / 64, p99 {p99s} ms (the previous run: about 115 req/s, p99 up
to 2.4 s).
A creation is a write: one transaction, one AES-GCM wrap in the token, one fsync'd commit;
SQLite admits one writer at a time, so creations queue. They used to wait for each other
in SQLite's busy handler, which sleeps with a growing back-off; writers of one process
now queue on a lock (`kms/db.py:Database._writer`) and wake in turn. The token anchor
that followed every state change (a search, a create and a destroy in the token) now runs
in the background."""


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
                 and not r["function"].endswith((":_run", ":op", ":_run_locked"))]
    top = ", ".join(f"`{r['function']}` ({r['calls']:,} calls, {r['cumulative_ms']:,.0f} ms)"
                    for r in token_fns[:4])
    total = (large.get("erase_one_profiled") or {}).get("erase_ms")
    biggest = vk[-1] if vk else {}
    small_ms = vk[0]["erase_ms"] if vk else None
    big_verdict = "met" if biggest.get("erase_ms", 1e9) < 2000 else "missed"
    one_ms = one.get("erase_ms")
    one_verdict = "missed" if one_ms is None or one_ms >= 2000 else "under the 2 s target"
    objects = large.get("token_objects")
    per_object = (one_ms / 2 / objects * 1000) if one_ms and objects else None
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

What grows is the size of the *token*: erasing a one-key tenant in a token holding
{_r(large.get('tenants'))} tenants ({objects if objects is not None else '?'} objects) took
{_r(one_ms)} ms ({one_verdict}; {_r(small_ms)} ms in a small token). The erasure now makes
exactly two passes over the token — one that destroys (the tenant's KEKs by CKA_ID and
everything under its label prefix, label and ID read in one call per object:
`hsm/adapter.py:Pkcs11Hsm.destroy_objects`) and one fresh confirming search in a new
session (`find_remaining`); both are required (DESIGN: destroy by recorded CKA_IDs and
by label prefix, to catch orphans; erasure is not reported done before a fresh search finds
nothing). PKCS#11 has no prefix search, so each pass reads the label of every object in
the token: about {_r(per_object, 0)} µs an object per pass here. Where that goes (strace and
timings on a token of 10,000 keys, made while building the bench): python-pkcs11 reads
two attributes of every object a search returns (`make_object`), and the pass reads label
and CKA_ID in one more call; SoftHSM's file store answers each C_GetAttributeValue by
opening, locking and reading the token's `generation` file and the object's own file
(14 system calls). A search by exact template, which reads no attribute, costs about
20 µs an object; reading the objects' attributes is the rest. cProfile of a second such erasure
({_r(total)} ms under the profiler), token functions by cumulative time: {top or 'n/a'}.
Ways out, none taken here: a hardware or network HSM (indexed object stores, attributes
read from memory), SoftHSM built with its SQLite object store (Debian's package is not),
several tokens each holding a bounded number of tenants, or a PKCS#11 binding that reads
only the label (python-pkcs11 offers no search that skips `make_object`; a hand-written
binding is what STYLE.md tells us not to write). Out of reach with this stack on one
SoftHSM file token, then. The target itself (a tenant with
{_r(biggest.get('volumes'))} volume keys, under 2 s) is {big_verdict}."""


def _token_scaling(x: _Ctx) -> str:
    mem = x.res.get("memory") or {}
    s, l_ = mem.get("small") or {}, mem.get("large") or {}
    if not s or not l_:
        return "### 9. Scaling with the size of the token\n\nNot measured in this run."
    rs, rl = s.get("probe_rate"), l_.get("probe_rate")
    return f"""### 9. Scaling with the size of the token

Tenant creation: {_r(rs, 1)}/s with {s['tenants']:,} tenants in the token, {_r(rl, 1)}/s with
{l_['tenants']:,} (each creation generates a KEK in the token, and SoftHSM's object
creation also grows with the objects it holds). The same {s.get('exercised_tenants', 0) * 7}
requests across {s.get('exercised_tenants', '?')} tenants took {_r(s.get('exercise_seconds'), 1)} s
against {_r(l_.get('exercise_seconds'), 1)} s. The journal's anchor and the usage counters no
longer search the token (the adapter keeps the object it last wrote under each counter
label), and the anchor rests ten times as long as its last write took, so a large token
is never kept busy by it. What still grows is each tenant's first use in a process: its
KEK is found by CKA_ID and a new key's usage counter by label, searches that SoftHSM's
file store answers object by object (about 20 µs an object, section 7), so a tenant's
first requests here cost a few such searches of the whole token; the adapter keeps the
objects it found, and later requests do not search again. An HSM that indexes its
objects removes this; with SoftHSM it is linear in the token's size."""


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


def analysis(res: dict[str, Any], table: Any) -> str:
    x = _Ctx(res)
    parts: list[str] = []
    sections: list[Callable[[], str]] = [
        lambda: _summary(x, table), lambda: _changes(x), lambda: _data_plane(x),
        lambda: _batch(x),
        lambda: _peer(x), lambda: _volcreate(x), lambda: _workers(x), lambda: _tls(x),
        lambda: _erasure(x), lambda: _memory(x), lambda: _token_scaling(x)]
    for section in sections:
        try:
            parts.append(section())
        except Exception as exc:  # noqa: BLE001 - a partial run still gets its report
            parts.append(f"(a section could not be written: {type(exc).__name__}: {exc})")
    return "\n\n".join(parts)
