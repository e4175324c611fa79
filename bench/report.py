"""BENCHMARKS.md: the table (every figure against its target), the machine, the date,
the command, the profiles and what they say. The same table is printed on stdout."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.common import median

MET, MISSED, INFO = "met", "**missed**", ""


def _n(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}"


def _ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x < 0.1:
        return f"{x * 1000:.1f} µs"
    if x >= 100:
        return f"{x:,.0f} ms"
    if x >= 10:
        return f"{x:.1f} ms"
    return f"{x:.2f} ms"


def _pct(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def agg(entry: dict[str, Any] | None, c: int | str) -> dict[str, float] | None:
    """Median over repetitions of one HTTP measurement at concurrency c."""
    if not entry:
        return None
    runs = entry["runs"].get(c) or entry["runs"].get(str(c))
    if not runs:
        return None
    unit = entry.get("unit", 1)
    return {
        "rate": median([r["requests"] / r["seconds"] * unit for r in runs]),
        "p50": median([r["p50_ms"] for r in runs]),
        "p99": median([r["p99_ms"] for r in runs]),
        "server_cpu": median([r["server_cpu"] for r in runs]),
        "client_cpu": max(r["client_cpu"] for r in runs),
        "errors": sum(sum(r["errors"].values()) for r in runs),
        "capped": any(r["capped"] for r in runs),
        "n": len(runs),
    }


def paired_ratio(http: dict[str, Any], key: str, base: str, c: int | str) -> float | None:
    """Median over rounds of key's rate / base's rate in the same round (they run seconds
    apart), which holds better than a ratio of medians when the host slows down and
    speeds up during a run; a ratio of medians when the rounds do not pair."""
    a, b = http.get(key), http.get(base)
    if not a or not b:
        return None
    ra = a["runs"].get(c) or a["runs"].get(str(c)) or []
    rb = b["runs"].get(c) or b["runs"].get(str(c)) or []
    if ra and len(ra) == len(rb):
        ua, ub = a.get("unit", 1), b.get("unit", 1)
        return median([(x["requests"] / x["seconds"] * ua) / (y["requests"] / y["seconds"] * ub)
                       for x, y in zip(ra, rb, strict=True) if y["requests"]])
    ma, mb = agg(a, c), agg(b, c)
    return ma["rate"] / mb["rate"] if ma and mb and mb["rate"] else None


class Table:
    HEADER = ("Measurement", "Conc.", "Throughput", "p50", "p99", "Against", "Target",
              "Result")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.verdicts: list[tuple[str, str, str]] = []  # (what, result, figure)

    def section(self, title: str) -> None:
        self.rows.append((f"**{title}**",) + ("",) * (len(self.HEADER) - 1))

    def row(self, what: str, conc: str, thr: str, p50: str, p99: str, against: str = "",
            target: str = "", result: str = INFO) -> None:
        self.rows.append((what, conc, thr, p50, p99, against, target, result))
        if result in (MET, MISSED):
            self.verdicts.append((f"{what} (c={conc})" if conc else what, result,
                                  f"{thr}; {against}" if against else thr))

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |",
                 "|" + "|".join("---" for _ in self.HEADER) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return INFO if ok is None else (MET if ok else MISSED)


def build_table(res: dict[str, Any]) -> Table:
    t = Table()
    http = res.get("http", {})
    conc = res.get("settings", {}).get("concurrency", (1, 16, 64))

    def per_s(a: dict[str, float] | None, unit: str = "req/s") -> str:
        if a is None:
            return "—"
        flag = " ⚠errors" if a["errors"] else (" ⚠capped" if a["capped"] else "")
        return f"{_n(a['rate'])} {unit}{flag}"

    if http:
        t.section("HTTP, one `kms serve` process, plain HTTP, data-plane audit on "
                  "(wrk on its own core)")
        for c in conc:
            bare = agg(http.get("bare"), c)
            if bare:
                t.row("bare endpoint: HTTP ceiling", str(c), per_s(bare), _ms(bare["p50"]),
                      _ms(bare["p99"]), f"server CPU {_pct(bare['server_cpu'])}", "ceiling")
        for key in ("bare-sync", "bare-direct", "probe-noop", "probe-auth"):
            for c in conc:
                a, bare = agg(http.get(key), c), agg(http.get("bare"), c)
                if a is not None:
                    ratio = paired_ratio(http, key, "bare", c) if bare else None
                    t.row(http[key]["label"], str(c), per_s(a), _ms(a["p50"]), _ms(a["p99"]),
                          f"{_pct(ratio)} of bare" if ratio is not None else "")
        for key, target in (("encrypt", 0.70), ("keyfetch", 0.60), ("keyfetch-cold", 0.60),
                            ("decrypt", None),
                            ("datakey", None), ("volcreate", None)):
            for c in conc:
                a, bare = agg(http.get(key), c), agg(http.get("bare"), c)
                if a is None:
                    continue
                paired = paired_ratio(http, key, "bare", c) if bare else None
                ratio = paired if paired is not None else float("nan")
                t.row(http[key]["label"], str(c), per_s(a), _ms(a["p50"]), _ms(a["p99"]),
                      f"{_pct(ratio)} of bare", f"≥ {target:.0%} of bare" if target else "",
                      _verdict(ratio >= target if target and bare else None))
        for c in conc:
            a = agg(http.get("batch"), c)
            if a is not None:
                t.row("batch encrypt 1,000 × 1 KiB", str(c), per_s(a, "items/s"),
                      _ms(a["p50"]), _ms(a["p99"]), f"{_n(a['rate'] / 1000, 1)} req/s",
                      "≥ 50,000 items/s", _verdict(a["rate"] >= 50_000))

        t.section("Audit journal cost: the same server with KMS_AUDIT_DATA_PLANE=false")
        for key in ("encrypt", "keyfetch", "decrypt", "datakey"):
            for c in conc:
                off, on = agg(http.get(f"{key}-noaudit"), c), agg(http.get(key), c)
                bare = agg(http.get("bare"), c)
                if off is None:
                    continue
                cost = 1 - on["rate"] / off["rate"] if on else float("nan")
                extra = f"; {_pct(off['rate'] / bare['rate'])} of bare" if bare else ""
                t.row(f"{http[key]['label']}, audit off", str(c), per_s(off), _ms(off["p50"]),
                      _ms(off["p99"]), f"journal costs {_pct(cost)} of throughput{extra}")

        for key in ("encrypt", "keyfetch"):
            for c in conc:
                ho, on = agg(http.get(f"{key}-handoffs"), c), agg(http.get(key), c)
                off, bare = agg(http.get(f"{key}-noaudit"), c), agg(http.get("bare"), c)
                if ho is None:
                    continue
                parts = []
                if on and off:
                    # CPU per request: on − hand-offs is the writer's own work over HTTP,
                    # hand-offs − off what handing the events over costs.
                    us = {k: 1e6 * v["server_cpu"] / v["rate"] for k, v in
                          (("on", on), ("ho", ho), ("off", off)) if v["rate"]}
                    if len(us) == 3:
                        parts.append(f"writer's work {_n(us['on'] - us['ho'])} µs, hand-offs "
                                     f"{_n(us['ho'] - us['off'])} µs of CPU per request")
                if bare:
                    parts.append(f"{_pct(ho['rate'] / bare['rate'])} of bare")
                t.row(f"{http[key]['label']}, journal hand-offs only (its writer writes "
                      "nothing)", str(c), per_s(ho), _ms(ho["p50"]), _ms(ho["p99"]),
                      "; ".join(parts))

        t.section("TLS (the default; the rows above use --insecure-http on loopback)")
        for c in conc:
            bare_tls, bare = agg(http.get("bare-tls"), c), agg(http.get("bare"), c)
            if bare_tls:
                t.row("bare endpoint, TLS", str(c), per_s(bare_tls), _ms(bare_tls["p50"]),
                      _ms(bare_tls["p99"]),
                      f"{_pct(bare_tls['rate'] / bare['rate'])} of plain bare" if bare else "")
        for key in ("encrypt-tls", "keyfetch-tls"):
            for c in conc:
                a, bare_tls = agg(http.get(key), c), agg(http.get("bare-tls"), c)
                if a is None:
                    continue
                ratio = a["rate"] / bare_tls["rate"] if bare_tls else float("nan")
                t.row(http[key]["label"], str(c), per_s(a), _ms(a["p50"]), _ms(a["p99"]),
                      f"{_pct(ratio)} of bare TLS")

    ceil = res.get("ceilings")
    if ceil:
        t.section("Ceilings in process (one core, no HTTP)")
        for key, label in (("aesgcm_encrypt_1k", "AES-256-GCM encrypt 1 KiB (`cryptography`)"),
                           ("aesgcm_decrypt_1k", "AES-256-GCM decrypt 1 KiB (`cryptography`)"),
                           ("hsm_gcm_decrypt_64b",
                            "SoftHSM AES-GCM decrypt (unwrap 64 B), serialized"),
                           ("hsm_gcm_encrypt_64b",
                            "SoftHSM AES-GCM encrypt (wrap 64 B), serialized"),
                           ("hsm_hmac_sha256", "SoftHSM HMAC-SHA256 (the journal's MAC "
                            "before segment keys)"),
                           ("hmac_sha256_segment", "HMAC-SHA256 in process under the "
                            "segment key (one audit MAC now)"),
                           ("hsm_raise_counter", "SoftHSM counter raise (one journal anchor: "
                            "search, create, destroy a token object)"),
                           ("sqlite_commit_fsync", "SQLite WAL commit, synchronous=FULL")):
            if key in ceil:
                r = ceil[key]
                cpu_note = f"CPU {r['cpu_us']:,.1f} µs per op" if "cpu_us" in r else ""
                t.row(label, "1", f"{_n(r['rate'])} op/s", _ms(r["p50_us"] / 1000),
                      _ms(r["p99_us"] / 1000), cpu_note, "ceiling")

    workers = res.get("workers")
    if workers:
        t.section("Processes: `kms serve` processes sharing one home (SQLite + SoftHSM file "
                  "token); wrk not pinned, it shares the 2 cores")
        configs = ("1 process on CPU 0", "1 process, unpinned", "2 processes, unpinned",
                   "2 processes, one per core")

        def rate(w: dict[str, Any] | None) -> float | None:
            return w["requests"] / w["seconds"] if w and w["seconds"] else None

        for c in (16, 64):
            for op, label in (("bare", "bare endpoint"), ("encrypt", "encrypt 1 KiB"),
                              ("keyfetch", "volume key fetch")):
                base = rate(workers.get(f"{op}|{configs[0]}|{c}"))
                for name in configs:
                    w = workers.get(f"{op}|{name}|{c}")
                    if not w:
                        continue
                    r = rate(w)
                    parts = []
                    if name != configs[0] and base and r:
                        parts.append(f"{r / base:.2f}× 1 process on CPU 0")
                    bare_rate = rate(workers.get(f"bare|{name}|{c}"))
                    if op != "bare" and bare_rate and r:
                        parts.append(f"{_pct(r / bare_rate)} of bare, same setup")
                    err = " ⚠errors" if sum(w["errors"].values()) else ""
                    t.row(f"{label}, {name}", str(c), f"{_n(r)} req/s{err}", _ms(w["p50_ms"]),
                          _ms(w["p99_ms"]), "; ".join(parts))

    peer = res.get("peer")
    if peer:
        t.section("Peer: PyKMIP server vs ours over TLS, same Python client harness "
                  "(threads, one connection each)")
        rows = {(r["system"], r["op"], r["concurrency"]): r for r in peer["results"]}
        names = {"create": "create AES-256 key", "get": "get key (release)",
                 "encrypt": "encrypt 1 KiB (AES-GCM on the server)"}
        for (system, op, c), r in sorted(rows.items(), key=lambda kv: (kv[0][2], kv[0][1])):
            if system != "pykmip":
                continue
            ours = rows.get(("ours", op, c))
            noaudit = rows.get(("ours-noaudit", op, c))
            def cpu(x: dict[str, Any]) -> str:
                err = f"; {x['error_count']} errors" if x["error_count"] else ""
                return (f"server CPU {_pct(x.get('server_cpu'))}, client CPU "
                        f"{_pct(x.get('client_cpu'))}{err}")

            t.row(f"PyKMIP: {names[op]}", str(c), f"{_n(r['rate'])} op/s", _ms(r["p50_ms"]),
                  _ms(r["p99_ms"]), cpu(r))
            if ours:
                ratio = ours["rate"] / r["rate"] if r["rate"] else float("nan")
                t.row(f"ours: {names[op]}", str(c), f"{_n(ours['rate'])} op/s",
                      _ms(ours["p50_ms"]), _ms(ours["p99_ms"]),
                      f"**{ratio:.2f}× PyKMIP**; {cpu(ours)}", "≥ 1.00× PyKMIP",
                      _verdict(ratio >= 1.0 and not ours["error_count"]))
            if noaudit:
                ratio = noaudit["rate"] / r["rate"] if r["rate"] else float("nan")
                t.row(f"ours, audit off: {names[op]}", str(c), f"{_n(noaudit['rate'])} op/s",
                      _ms(noaudit["p50_ms"]), _ms(noaudit["p99_ms"]),
                      f"{ratio:.2f}× PyKMIP; {cpu(noaudit)}")

    er = res.get("erasure")
    if er:
        t.section("Erasure: offboard, clock moved past the 21-day deadline, erase "
                  "(in process, real token)")
        for row in er.get("volume_keys", []):
            t.row(f"erase tenant with {row['volumes']:,} volume keys", "1",
                  f"{_n(row['erase_ms'])} ms", "", "",
                  f"offboard {_n(row['offboard_ms'])} ms; {row['volumes']:,} creates took "
                  f"{row['create_seconds']:.1f} s", "< 2,000 ms",
                  _verdict(row["erase_ms"] < 2000))
        dv = er.get("data_volume", [])
        if dv:
            lo = min(r["erase_ms"] for r in dv)
            hi = max(r["erase_ms"] for r in dv)
            constant = hi <= max(1.5 * lo, lo + 100)
            for row in dv:
                t.row(f"erase tenant whose key protects {row['data_mib']:,} MiB "
                      f"({row['ciphertext_bytes'] / 2**20:,.0f} MiB ciphertext)", "1",
                      f"{_n(row['erase_ms'])} ms", "", "",
                      f"one-pass overwrite of the same bytes: {_n(row['overwrite_ms'])} ms",
                      "constant in data volume", _verdict(constant))
    mem = res.get("memory")
    if mem:
        t.section("Memory of `kms serve`, and how it scales with the tenants in the token")
        small, large = mem.get("small"), mem.get("large")
        for row in (small, large):
            if not row:
                continue
            t.row(f"peak RSS (VmHWM), {row['tenants']:,} tenants, after "
                  f"{row['requests']['ok']} requests across {row['exercised_tenants']}", "",
                  f"{_n(row['hwm_kib'] / 1024, 1)} MiB", "", "",
                  f"RSS right after start {_n((row['rss_after_start_kib'] or 0) / 1024, 1)} MiB")
        if small and large and large["tenants"] > small["tenants"]:
            per = ((large["rss_after_start_kib"] or 0) - (small["rss_after_start_kib"] or 0)) \
                / (large["tenants"] - small["tenants"])
            t.row("RSS per extra tenant (after start)", "", f"{_n(per, 2)} KiB", "", "", "")
        for row in (small, large):
            if not row:
                continue
            t.row(f"tenant create (service as is) with {row['tenants']:,} tenants in the token",
                  "1", f"{_n(row.get('probe_rate'), 1)} /s", "", "",
                  f"{row['exercised_tenants'] * 7} mixed requests took "
                  f"{row.get('exercise_seconds', float('nan')):.1f} s")
        if large and "erase_one" in large:
            e = large["erase_one"]
            t.row(f"erase a 1-key tenant in a token holding {large['tenants']:,} tenants",
                  "1", f"{_n(e['erase_ms'])} ms", "", "",
                  f"{large.get('token_objects', '?')} objects in the token",
                  "< 2,000 ms", _verdict(e["erase_ms"] < 2000))
    return t


def _profile_md(profiles: dict[str, Any]) -> str:
    out = []
    for key, p in profiles.items():
        if "error" in p:
            out.append(f"- {p['label']}: {p['error']}")
            continue
        if p.get("mode") == "wall":
            what = (f"wall time of the threads serving `{p.get('only')}` (py-spy --idle), "
                    f"{p['samples']} samples")
            head = "where those threads were (innermost known frame)"
        else:
            what = f"CPU: the GIL-holding thread (py-spy --gil), {p['samples']} samples"
            head = "where the GIL-holding thread was (innermost known frame)"
        rate = f", {p['rate']:,.0f}/s while sampled" if p.get("rate") else ""
        out.append(f"\n#### {p['label']} ({key}): {what}, c=16{rate}\n")
        out.append(f"| {head} | share |")
        out.append("|---|---|")
        out += [f"| {k} | {v:.1f}% |" for k, v in p["categories"]]
        out.append("\nService functions on the stack (inclusive):\n")
        out.append("| function | share |")
        out.append("|---|---|")
        out += [f"| `{k}` | {v:.1f}% |" for k, v in p["own_inclusive"][:10]]
    return "\n".join(out)


def write_report(res: dict[str, Any], out: Path, run_dir: Path) -> str:
    from bench.analysis import analysis

    table = build_table(res)
    md = table.markdown()
    m = res.get("machine", {})
    wrk_cpu = [r["client_cpu"] for e in res.get("http", {}).values()
               for runs in e["runs"].values() for r in runs]
    missed = [v for v in table.verdicts if v[1] == MISSED]
    met = [v for v in table.verdicts if v[1] == MET]
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `{res.get('command', 'make bench')}` on {res.get('started', '?')} (UTC); "
        f"the run took {res.get('elapsed_seconds', 0) / 60:.1f} min. Every figure below comes "
        "from that one run: ceilings, service and peer were measured side by side, so that "
        "ratios hold on a noisy shared machine. Raw results: `bench/runs/<date>/results.json` "
        "(not committed).",
        "",
        "## Machine",
        "",
        *[f"- **{k}**: {v}" for k, v in m.items()],
        "",
        "## Method",
        "",
        "- Load: `wrk` 4 (one thread, N keep-alive connections, HdrHistogram latencies) with a "
        "Lua script per operation; each run lasts "
        f"{res.get('settings', {}).get('seconds', '?')} s after a 1 s warm-up per operation, "
        "and is also bounded in request count. wrk never used more than "
        f"{_pct(max(wrk_cpu) if wrk_cpu else float('nan'))} of its core, so the load "
        "generator is not the bottleneck; before each run the bench waits until the servers "
        "are idle (requests queued by the previous run drained). The bare endpoint, encrypt, "
        "key fetch (each also with the journal off) and "
        f"batch ran {res.get('settings', {}).get('reps', '?')} times, interleaved with "
        "everything else; the table quotes the median throughput, median p50 and median p99, "
        "and a ratio to the bare endpoint is the median of the per-round ratios (in each "
        "round the bare endpoint, encrypt, key fetch and the two with the journal off run one "
        "after the other, seconds apart, so a slowdown of the shared host hits both sides of "
        "a ratio). "
        "The other rows ran once.",
        "- Servers: `kms serve` (uvicorn, h11, asyncio, one process) on CPU 0, wrk on CPU 1. "
        "The bare endpoint (`bench/bare.py`) is a FastAPI app on the very same uvicorn "
        "configuration (`cli.serve._config`, same JSON access log) with an `async` route, as "
        "the service's are, that parses the same pydantic body as encrypt (1 KiB plaintext, "
        "base64) and answers a constant: no middleware, no database, no token, no crypto. "
        "The same route as a plain `def` (run in the thread pool) is shown beside it, and "
        "the same route through the service's route class (`api.strict_json."
        "StrictJsonRoute`: a well-formed request is called directly, without FastAPI's "
        "dependency resolution, as the data plane's are): a stricter ceiling, run in every "
        "round; the targets are read against the plain route.",
        "- Plain HTTP (`--insecure-http`, loopback) for the main rows, TLS measured beside it; "
        "the peer comparison is over TLS on both sides.",
        "- Data-plane audit events are on (the default) unless a row says otherwise.",
        "- Peer: PyKMIP 0.11.0 (`bench/.peer-venv`), its own server on 127.0.0.1 with its "
        "SQLite database, TLS 1.2 with client certificates (generated per run), logging at "
        "WARNING; our `kms serve` over TLS on the same core. One Python client (threads, one "
        "persistent connection each, on the other core) drives both: PyKMIP's "
        "`ProxyKmipClient` and `http.client`.",
        "- Erasure and memory run in throwaway homes (fresh SoftHSM token each); erasure in "
        "process with a `FixedClock` moved 22 days past the notice (as the tests do).",
        "",
        "## Results",
        "",
        md,
        "",
        "## Targets",
        "",
        f"{len(met)} met, {len(missed)} missed.",
        "",
        *[f"- missed: {w} — {fig}" for w, _r, fig in missed],
        "",
    ]
    if res.get("profiles"):
        parts += ["## Profiles", "",
                  "py-spy 0.4 (`record --gil`, 200 Hz) attached to the server process while "
                  "wrk ran at concurrency 16. Raw collapsed stacks are in the run directory.",
                  _profile_md(res["profiles"]), ""]
    large = (res.get("memory") or {}).get("large") or {}
    prof_erase = large.get("erase_one_profiled") or {}
    if prof_erase.get("profile"):
        parts += [f"#### Erasure of a 1-key tenant in a token holding {large['tenants']:,} "
                  f"tenants (cProfile, in process; {prof_erase['erase_ms']:,.0f} ms under "
                  "the profiler)", "",
                  "| function | calls | cumulative |", "|---|---|---|",
                  *[f"| `{r['function']}` | {r['calls']:,} | {r['cumulative_ms']:,.0f} ms |"
                    for r in prof_erase["profile"][:12]], ""]
    parts += ["## What the figures say, and what to do", "", analysis(res, table), ""]
    if res.get("notes"):
        parts += ["## Notes", "", *[f"- {n}" for n in res["notes"]], ""]
    out.write_text("\n".join(parts))
    return md
