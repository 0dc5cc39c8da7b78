"""The results as Markdown tables, and the issue's targets checked against them.

Absolute figures drift from run to run on a shared 2-core machine, so each figure is printed
beside its ratio to the floors measured in the same run (direct and plain mitmdump).
"""

from __future__ import annotations

from typing import Any

ORDER = ("direct", "mitmdump", "teegate", "teegate-pg", "teegate-w2", "litellm")
THROUGHPUT_MIN_RATIO = 0.85
ADDED_P50_MAX_MS = 1.0
ADDED_TTFT_P50_MAX_MS = 2.0
RSS_GROWTH_MAX = 1.10
# Several workers (issue 15), each against one worker on the same (PostgreSQL) ledger.
WORKERS_RPS_MIN = 1.6  # 2 workers' requests/second at 32 connections
WORKERS_TTFT_MAX = 0.7  # 2 workers' TTFT p50 at 500 streams
PG_RPS_MIN = 0.9  # one worker on PostgreSQL against one on SQLite
PACE_TIE_MS = 0.5  # inter-chunk delays this close count as level (timer resolution, not a lead)


def _paths(doc: dict[str, Any], section: str) -> list[str]:
    return [p for p in ORDER if p in doc.get(section, {})]


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def _delta(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a - b:+.2f}"


def _bad(r: dict[str, Any]) -> int:
    if "failed_in_repeats" in r:
        return r["failed_in_repeats"]
    return r.get("errors", 0) + sum(n for c, n in r.get("statuses", {}).items() if c != "200")


def small_table(doc: dict[str, Any]) -> str:
    small = doc["small"]
    rows = [
        "| path | conc. | req/s | ÷ direct | ÷ mitmdump | p50 ms | p99 ms | p50 vs mitmdump (ms) "
        "| proxy CPU ms/req | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    levels = sorted({int(c) for p in small.values() for c in p}, key=int)
    for c in levels:
        base = small.get("mitmdump", {}).get(str(c))
        floor = small.get("direct", {}).get(str(c))
        for name in _paths(doc, "small"):
            r = small[name].get(str(c))
            if r is None:
                continue
            lat = r["latency_ms"]
            rows.append(
                f"| {name} | {c} | {_f(r['rps'])} | {_ratio(r['rps'], floor and floor['rps'])} | "
                f"{_ratio(r['rps'], base and base['rps'])} | {_f(lat['p50'], 2)} | "
                f"{_f(lat['p99'], 2)} | "
                f"{_delta(lat['p50'], base and base['latency_ms']['p50'])} | "
                f"{_f(r.get('proxy_cpu_ms_per_request'), 3)} | {_bad(r)} |"
            )
    return "\n".join(rows)


def stream_table(doc: dict[str, Any]) -> str:
    stream = doc["stream"]
    rows = [
        "| path | streams | TTFT p50 ms | TTFT p99 ms | TTFT p50 vs mitmdump (ms) | "
        "first byte p50 ms | inter-chunk p50 ms | inter-chunk p99 ms | proxy CPU ms/stream | "
        "buffered | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    levels = sorted({int(c) for p in stream.values() for c in p}, key=int)
    for n in levels:
        base = stream.get("mitmdump", {}).get(str(n))
        for name in _paths(doc, "stream"):
            r = stream[name].get(str(n))
            if r is None:
                continue
            t, g, b = r["ttft_ms"], r["inter_chunk_ms"], r["ttfb_ms"]
            rows.append(
                f"| {name} | {n} | {_f(t['p50'], 2)} | {_f(t['p99'], 2)} | "
                f"{_delta(t['p50'], base and base['ttft_ms']['p50'])} | {_f(b['p50'], 2)} | "
                f"{_f(g['p50'], 2)} | {_f(g['p99'], 2)} | "
                f"{_f(r.get('proxy_cpu_ms_per_request'), 2)} | {r['buffered_streams']} | "
                f"{_bad(r) + r.get('no_token', 0)} |"
            )
    return "\n".join(rows)


def memory_table(doc: dict[str, Any]) -> str:
    mem = doc["memory"]
    rows = [
        "| path | RSS at start MB | peak RSS after small/streams MB | RSS warm MB | RSS after A MB "
        "| RSS after B MB | B ÷ A | peak RSS after B MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in _paths(doc, "memory"):
        m = mem[name]
        peak = max(
            (m[k]["peak_rss_mb"] for k in ("after_small", "after_streams") if k in m), default=None
        )
        ph = m.get("rss_phase") or {}
        a, b, w = _checkpoints(ph)
        rows.append(
            f"| {name} | {_f(m.get('start', {}).get('rss_mb'))} | {_f(peak)} | "
            f"{_f(w and w['rss_mb'])} | {_f(a and a['rss_mb'])} | {_f(b and b['rss_mb'])} | "
            f"{_ratio(b and b['rss_mb'], a and a['rss_mb'])} | {_f(b and b['peak_rss_mb'])} |"
        )
    checkpoints = doc.get("meta", {}).get("settings", {}).get("rss_checkpoints")
    if checkpoints:
        rows.append("")
        rows.append(
            f"A = after {checkpoints[0]:,} requests, B = after {checkpoints[1]:,} requests "
            "(fresh proxy, concurrency "
            f"{doc['meta']['settings'].get('rss_concurrency')}); start/peak columns: the "
            "instances used for the small and streaming figures."
        )
    return "\n".join(rows)


def _checkpoints(ph: dict[str, Any]) -> tuple[dict | None, dict | None, dict | None]:
    """(after first checkpoint, after last, warm) of an RSS phase."""
    keys = [k for k in ph if k.startswith("after_") and k != "after_warm"]
    keys.sort(key=lambda k: ph[k]["requests"])
    a = ph[keys[0]] if keys else None
    b = ph[keys[-1]] if len(keys) > 1 else None
    return a, b, ph.get("after_warm")


def workers_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Two workers against one (both on PostgreSQL), and PostgreSQL against SQLite; only
    when the run had a database (``--pg``)."""
    small, stream = doc.get("small", {}), doc.get("stream", {})
    out: list[dict[str, Any]] = []

    def ratio(target: str, a: float | None, b: float | None, ok: Any) -> None:
        if a is not None and b:
            out.append({"target": target, "value": f"{a / b:.2f}×", "met": ok(a / b)})

    one, two = small.get("teegate-pg", {}), small.get("teegate-w2", {})
    lite = small.get("teegate", {})
    if "32" in one and "32" in two:
        ratio(
            f"2 workers >= {WORKERS_RPS_MIN}× one worker's req/s at c=32 (PostgreSQL)",
            two["32"]["rps"],
            one["32"]["rps"],
            lambda r: r >= WORKERS_RPS_MIN,
        )
    s1, s2 = stream.get("teegate-pg", {}).get("500"), stream.get("teegate-w2", {}).get("500")
    if s1 and s2:
        ratio(
            f"2 workers' TTFT p50 at 500 streams <= {WORKERS_TTFT_MAX}× one worker's",
            s2["ttft_ms"]["p50"],
            s1["ttft_ms"]["p50"],
            lambda r: r <= WORKERS_TTFT_MAX,
        )
    for c in sorted(one, key=int):
        if c in lite:
            ratio(
                f"PostgreSQL one worker >= {PG_RPS_MIN}× SQLite's req/s at c={c}",
                one[c]["rps"],
                lite[c]["rps"],
                lambda r: r >= PG_RPS_MIN,
            )
    return out


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figures it was judged on and whether it was met
    (``None`` when a figure is missing)."""
    out: list[dict[str, Any]] = []
    small, stream, mem = doc.get("small", {}), doc.get("stream", {}), doc.get("memory", {})
    tg, md = small.get("teegate", {}), small.get("mitmdump", {})
    for c in sorted(tg, key=int):
        if c in md:
            ratio = tg[c]["rps"] / md[c]["rps"] if md[c]["rps"] else None
            out.append(
                {
                    "target": f"throughput c={c} >= {THROUGHPUT_MIN_RATIO:.0%} of mitmdump",
                    "value": None if ratio is None else f"{ratio:.1%}",
                    "met": None if ratio is None else ratio >= THROUGHPUT_MIN_RATIO,
                }
            )
    if "1" in tg and "1" in md:
        added = tg["1"]["latency_ms"]["p50"] - md["1"]["latency_ms"]["p50"]
        out.append(
            {
                "target": f"added p50 at c=1 <= {ADDED_P50_MAX_MS} ms over mitmdump",
                "value": f"{added:+.2f} ms",
                "met": added <= ADDED_P50_MAX_MS,
            }
        )
    stg, smd = stream.get("teegate", {}), stream.get("mitmdump", {})
    for n in sorted(stg, key=int):
        a, b = stg[n]["ttft_ms"]["p50"], smd.get(n, {}).get("ttft_ms", {}).get("p50")
        if a is not None and b is not None:
            out.append(
                {
                    "target": f"added TTFT p50 at {n} streams <= {ADDED_TTFT_P50_MAX_MS} ms",
                    "value": f"{a - b:+.2f} ms",
                    "met": a - b <= ADDED_TTFT_P50_MAX_MS,
                }
            )
    if stg:
        buffered = {n: r["buffered_streams"] for n, r in stg.items()}
        out.append(
            {
                "target": "no buffered stream at any concurrency",
                "value": ", ".join(f"{n}: {b}" for n, b in buffered.items()),
                "met": not any(buffered.values()),
            }
        )
    a, b, _ = _checkpoints(mem.get("teegate", {}).get("rss_phase") or {})
    if a and b:
        growth = b["rss_mb"] / a["rss_mb"]
        out.append(
            {
                "target": f"RSS after {b['requests']:,} within 10% of after {a['requests']:,}",
                "value": f"{a['rss_mb']} -> {b['rss_mb']} MB ({growth:.2f}×)",
                "met": growth <= RSS_GROWTH_MAX,
            }
        )
    if "litellm" in small or "litellm" in stream:
        behind = _behind_litellm(doc)
        out.append(
            {
                "target": "ahead of LiteLLM on every figure",
                "value": "ahead on all" if not behind else "behind on: " + "; ".join(behind),
                "met": not behind,
            }
        )
    out += workers_targets(doc)
    for name in ORDER:
        bad = sum(_bad(r) for r in small.get(name, {}).values()) + sum(
            _bad(r) + r.get("no_token", 0) for r in stream.get(name, {}).values()
        )
        if bad:
            out.append(
                {
                    "target": f"every {name} request answered 200 (figures are valid)",
                    "value": f"{bad} failed",
                    "met": False,
                }
            )
    return out


def _behind_litellm(doc: dict[str, Any]) -> list[str]:
    behind: list[str] = []
    for c, r in doc["small"].get("teegate", {}).items():
        ll = doc["small"].get("litellm", {}).get(c)
        if ll is None:
            continue
        if r["rps"] <= ll["rps"]:
            behind.append(f"req/s c={c}")
        for q in ("p50", "p99"):
            if r["latency_ms"][q] >= ll["latency_ms"][q]:
                behind.append(f"latency {q} c={c}")
    for n, r in doc["stream"].get("teegate", {}).items():
        ll = doc["stream"].get("litellm", {}).get(n)
        floor = doc["stream"].get("direct", {}).get(n)
        if ll is None:
            continue
        for q in ("p50", "p99"):
            a, b = r["ttft_ms"][q], ll["ttft_ms"][q]
            if a is not None and b is not None and a >= b:
                behind.append(f"TTFT {q} n={n}")
            # Inter-chunk delay: nearest to the upstream's own pace (the direct path) is best;
            # bunched chunks (~0 ms, as from a buffering relay) are as far off as late ones.
            if floor is None:
                continue
            pace, a, b = floor["inter_chunk_ms"][q], r["inter_chunk_ms"][q], ll["inter_chunk_ms"][q]
            if None not in (pace, a, b) and abs(a - pace) > abs(b - pace) + PACE_TIE_MS:
                behind.append(f"inter-chunk {q} (distance from direct's pace) n={n}")
        if r["buffered_streams"] > ll["buffered_streams"]:
            behind.append(f"buffered n={n}")
    tm, lm = doc["memory"].get("teegate", {}), doc["memory"].get("litellm", {})
    for k in ("after_small", "after_streams"):
        if k in tm and k in lm and tm[k]["peak_rss_mb"] >= lm[k]["peak_rss_mb"]:
            behind.append(f"peak RSS {k}")
    return behind


def targets_table(doc: dict[str, Any]) -> str:
    rows = ["| target | value | met |", "|---|---|:-:|"]
    for t in doc.get("targets", []):
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        rows.append(f"| {t['target']} | {t['value']} | {met} |")
    return "\n".join(rows)


def markdown(doc: dict[str, Any]) -> str:
    meta = doc.get("meta", {})
    parts = [
        f"## teegate benchmark ({meta.get('profile', '?')} run, {meta.get('started', '?')}, "
        f"git {meta.get('git', '?')}, {meta.get('cpus', '?')} CPUs, mitmproxy "
        f"{meta.get('mitmproxy', '?')}, load average {meta.get('load_average_start')} -> "
        f"{meta.get('load_average_end')})",
        "",
        "teegate path: " + _teegate_summary(doc),
    ]
    for name, why in doc.get("skipped", {}).items():
        parts.append(f"\n**{name} not measured:** {why}")
    parts += [
        "",
        "### Small non-streaming requests",
        "",
        small_table(doc),
        "",
        f"### Streams ({meta.get('upstream', {}).get('stream', 'streaming upstream')})",
        "",
        stream_table(doc),
        "",
        "### Memory of the proxy process",
        "",
        memory_table(doc),
        "",
        "### Targets",
        "",
        targets_table(doc),
        "",
    ]
    return "\n".join(parts)


def _teegate_summary(doc: dict[str, Any]) -> str:
    t = doc.get("paths", {}).get("teegate", {})
    if not t:
        return "not measured"
    return (
        f"addons {', '.join(t.get('addons', []))}; key check and billing: "
        f"{'on' if t.get('key_check_and_billing') else 'not in the chain'}; attestation "
        f"settings: {'configured' if t.get('attestation_configured') else 'none'}"
    )
