"""``python -m bench.chutes_cost`` runs end to end (not a timed test: no figure is judged):
both gateways served every request and stream, so the figures compare like with like."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.support.group_run import run_group

REPO = Path(__file__).resolve().parents[2]


def test_chutes_cost_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "chutes.json"
    done = run_group(
        [sys.executable, "-m", "bench.chutes_cost", "--rounds", "1", "--out", str(out)],
        cwd=REPO,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    for kind in ("small", "stream"):
        for name in ("plain", "e2ee"):
            (run,) = doc[kind][name]
            assert run["errors"] == 0 and set(run["statuses"]) == {"200"}, (kind, name, run)
    per_request, per_stream = doc["summary"]["per_request"], doc["summary"]["per_stream"]
    assert per_request["added_latency_p50_ms"] is not None
    assert per_stream["buffered_streams"] == {"plain": 0, "e2ee": 0}
