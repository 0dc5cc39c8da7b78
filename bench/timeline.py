"""Time to first token under concurrent streams, teegate against plain mitmdump, with teegate's
per-request timeline (``python -m bench.timeline [--streams 100] [--repeat 3]``).

Both proxies run side by side in front of one streaming sandbox (50 chunks, 20 ms apart) and
are driven in turn by the load generator, ``--repeat`` times interleaved, so that other work on
a shared machine lands on both; the ratios and differences within one repetition are what to
read. teegate runs under :mod:`bench.timeline_probe`, which adds ~10 us of markers per request,
and reports, per flow, when each addon's ``request`` hook finished, when the upstream connection
was made, when the upstream's first byte came and when the first chunk was relayed, all from
the first byte of the request. The summary gives p50 and p90 over the flows of the last
repetition.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import STREAM_CHUNKS, STREAM_DELAY_MS, LoadGen, log
from bench.paths import Mitmdump
from bench.procs import load_average
from bench.stats import summarize
from bench.teegate_path import TeegatePath
from tests.support.sandbox_proc import start_sandbox


def _gaps(rec: dict[str, Any]) -> dict[str, float]:
    """Per flow: the request read, each addon's share of the request hook, and what followed."""
    out: dict[str, float] = {}
    if rec.get("request_read") is not None:
        out["request read"] = rec["request_read"]
    marks = rec["marks"]
    for (name, t), (_, t_next) in zip(marks, marks[1:], strict=False):
        if name in ("(end of chain)", "first chunk relayed"):
            continue
        out[f"  {name}"] = round(t_next - t, 3)
    for name, t in marks:
        if name in ("(end of chain)", "first chunk relayed"):
            out[f"@ {name}"] = t
    for key in ("upstream_connect_start", "upstream_connected", "upstream_first_byte"):
        if rec.get(key) is not None:
            out[f"@ {key}"] = rec[key]
    return out


def summary(records: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    columns: dict[str, list[float]] = {}
    for rec in records:
        if rec.get("status") != 200:
            continue
        for k, v in _gaps(rec).items():
            columns.setdefault(k, []).append(v)
    return {k: summarize(v) for k, v in columns.items()}


def commit_summary(commits: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Where a group commit's time goes, ms: each step from the one before."""
    steps = {
        "transaction lock (drain -> lock taken)": ("t_drain", "t_call"),
        "hand-off (lock taken -> database thread runs)": ("t_call", "t_thread"),
        "transaction (BEGIN .. COMMIT on the thread)": ("t_thread", "t_thread_end"),
        "back on the loop (COMMIT -> writer resumes)": ("t_thread_end", "t_resumed"),
    }
    out: dict[str, dict[str, float | None]] = {}
    for label, (a, b) in steps.items():
        vals = [(c[b] - c[a]) * 1000 for c in commits if c.get(a) and c.get(b)]
        out[label] = summarize(vals)
    out["batch size (reservations)"] = summarize([c["reservations"] for c in commits])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.timeline")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="JSON of everything measured")
    p.add_argument(
        "--before",
        action="store_true",
        help="also run teegate with the reservation path as before session 6 (a commit "
        "started one loop iteration after its first submit), interleaved with the others",
    )
    args = p.parse_args(argv)
    spread = (STREAM_CHUNKS - 1) * STREAM_DELAY_MS
    results: dict[str, Any] = {"load_average_start": load_average(), "repeats": []}
    with tempfile.TemporaryDirectory(prefix="teegate-timeline-") as tmp:
        work = Path(tmp)
        load = LoadGen(work)
        with start_sandbox(
            "--chunks", str(STREAM_CHUNKS), "--chunk-delay-ms", str(STREAM_DELAY_MS)
        ) as up:
            (work / "mitmdump").mkdir()
            mitm = Mitmdump().start(up, work / "mitmdump", True)
            timeline = work / "timeline.jsonl"
            tee_path = TeegatePath(
                module="bench.timeline_probe", env={"TEEGATE_TIMELINE_OUT": str(timeline)}
            )
            tee = tee_path.start(up, work / "teegate", True)
            targets = [("mitmdump", mitm), ("teegate", tee)]
            if args.before:
                hop_path = TeegatePath(
                    module="bench.timeline_probe",
                    env={
                        "TEEGATE_TIMELINE_OUT": str(work / "hop.jsonl"),
                        "TEEGATE_TIMELINE_BEFORE": "1",
                    },
                )
                targets.append(("teegate-before", hop_path.start(up, work / "hop", True)))
            try:
                for rep in range(args.repeat):
                    row: dict[str, Any] = {}
                    for name, target in targets:
                        log(f"{args.streams} streams, {name} ({rep + 1}/{args.repeat})")
                        r = load.run(
                            "stream",
                            target,
                            concurrency=args.streams,
                            rounds=args.rounds,
                            expected_spread_ms=spread,
                            stagger_ms=spread,
                            time_limit=40,
                        )
                        row[name] = {
                            "ttft_p50": r["ttft_ms"]["p50"],
                            "first_byte_p50": r["ttfb_ms"]["p50"],
                            "ttft_p90": r["ttft_ms"]["p90"],
                            "cpu_ms": r.get("proxy_cpu_ms_per_request"),
                        }
                    results["repeats"].append(row)
            finally:
                for _, target in targets:
                    target.stop()
        files = {"teegate": timeline}
        if args.before:
            files["teegate-before"] = work / "hop.jsonl"
        for name, path in files.items():
            records = [json.loads(line) for line in path.read_text().splitlines()]
            commits = [
                json.loads(line)
                for line in Path(str(path) + ".commits").read_text().splitlines()
            ]
            streams = [r for r in records if r["path"].endswith("/chat/completions")]
            last = streams[-args.streams * args.rounds :]
            results.setdefault("timeline", {})[name] = summary(last)
            results.setdefault("commits", {})[name] = commit_summary(commits)
    results["load_average_end"] = load_average()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results, args.streams))
    return 0


def markdown(results: dict[str, Any], streams: int) -> str:
    lines = [
        f"### {streams} concurrent streams (load average {results['load_average_start']} -> "
        f"{results['load_average_end']})",
        "",
        "| rep | mitmdump TTFT p50 | teegate TTFT p50 | added | ratio | mitmdump first byte p50 "
        "| teegate first byte p50 | CPU ms/stream m / t |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, row in enumerate(results["repeats"], 1):
        m = row["mitmdump"]
        for name in [n for n in row if n != "mitmdump"]:
            t = row[name]
            lines.append(
                f"| {i} {name} | {m['ttft_p50']:.2f} | {t['ttft_p50']:.2f} | "
                f"{t['ttft_p50'] - m['ttft_p50']:+.2f} | {t['ttft_p50'] / m['ttft_p50']:.2f}x | "
                f"{m['first_byte_p50']:.2f} | {t['first_byte_p50']:.2f} | "
                f"{m['cpu_ms']} / {t['cpu_ms']} |"
            )
    for name, timeline in results["timeline"].items():
        lines += [
            "",
            f"{name}: timeline of the last repetition, ms from the request's first byte "
            "(indented: time spent in that addon's request hook, awaits included; "
            "@: a point in time):",
            "",
            "| step | p50 | p90 | p99 |",
            "|---|---:|---:|---:|",
        ]
        for k, s in timeline.items():
            if k.startswith("  ") and (s.get("p90") or 0) < 0.05:
                continue  # addons that cost nothing measurable
            lines.append(f"| {k.strip()} | {s.get('p50')} | {s.get('p90')} | {s.get('p99')} |")
        lines += ["", f"{name}: group commits over every repetition, ms:", ""]
        lines.append("| step | n | p50 | p90 | p99 |")
        lines.append("|---|---:|---:|---:|---:|")
        for k, s in results["commits"][name].items():
            lines.append(f"| {k} | {s['n']} | {s['p50']} | {s['p90']} | {s['p99']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
