"""The benchmark harness runs end to end with tiny counts (not a timed test: no figure is judged).

Checks that every figure the issue asks for exists, for the direct floor, plain mitmdump and
teegate, and that every request got a 200: figures from failed requests would be meaningless.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.support.group_run import run_group

REPO = Path(__file__).resolve().parents[2]
PATHS = ("direct", "mitmdump", "teegate")
SMALL_LEVELS, STREAM_LEVELS = ("1", "4"), ("2", "3")


def test_harness_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    done = run_group(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--skip-litellm",
            "--out",
            str(out),
            "--requests",
            "30",
            "--warmup",
            "5",
            "--small-levels",
            ",".join(SMALL_LEVELS),
            "--stream-levels",
            ",".join(STREAM_LEVELS),
            "--stream-rounds",
            "1",
            "--rss-requests",
            "40,80",
        ],
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    pg = "skipped: needs a PostgreSQL database (--pg postgresql://...)"
    assert doc["skipped"] == {
        "litellm": "skipped (--skip-litellm)",
        "teegate-pg": pg,  # no --pg given: the PostgreSQL paths are left out, saying why
        "teegate-w2": pg,
    }
    assert set(doc["paths"]) == set(PATHS)
    for path in PATHS:
        for c in SMALL_LEVELS:
            r = doc["small"][path][c]
            assert r["statuses"] == {"200": 30} and r["errors"] == 0, (path, c, r)
            assert r["rps"] > 0
            assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
            if path != "direct":  # the proxy's CPU is measured (and 0 is a possible reading)
                assert r["proxy_cpu_ms_per_request"] >= 0 and r["proxy_cpu_s"] >= 0
        for n in STREAM_LEVELS:
            r = doc["stream"][path][n]
            assert r["streams"] == int(n) and r["errors"] == 0 and r["no_token"] == 0, (path, r)
            for fig in ("ttft_ms", "ttfb_ms", "inter_chunk_ms"):
                assert 0 < r[fig]["p50"] <= r[fig]["p99"], (path, n, fig, r[fig])
            # 50 chunks 20 ms apart: a relay that streams spreads them over ~1 s.
            assert r["buffered_streams"] == 0, (path, r)
            assert r["inter_chunk_ms"]["p50"] >= 15, (path, r)
    for path in ("mitmdump", "teegate"):
        mem = doc["memory"][path]
        assert mem["start"]["rss_mb"] > 10
        phase = mem["rss_phase"]
        assert phase["after_80"]["requests"] == 80 and phase["non_200"] == 0
        assert phase["after_80"]["peak_rss_mb"] >= phase["after_40"]["rss_mb"] > 10
    targets = {t["target"] for t in doc["targets"]}
    assert "no buffered stream at any concurrency" in targets
    assert "| teegate | 1 |" in done.stdout  # the Markdown table went to stdout
