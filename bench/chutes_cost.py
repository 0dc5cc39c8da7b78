"""``python -m bench.chutes_cost``: what end-to-end encryption adds per request and per stream.

Why a separate run: a Chutes upstream hands out single-use nonce tokens (5 instances x 10 per
discovery call, about 10 calls a minute), so an E2EE gateway cannot be driven at the harness's
thousands of requests a second; the budget itself is the throughput limit in production. This run
compares two gateways in front of the same Chutes-flavoured sandbox that differ only in
``upstream.e2ee`` (both attest every instance), at loads within the token budget, so the
difference is the E2EE path: sealing each request, the front door's ciphertext, the enclave's
decryption and sealing, opening the answer or every stream frame. ``proxy_cpu`` is the gateway's
own CPU time per request (the sandbox's is not counted); latency includes the sandbox's share.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import MODEL, STREAM_CHUNKS, STREAM_DELAY_MS, LoadGen, log
from bench.teegate_path import TeegatePath
from tests.support.sandbox_proc import SandboxProc, start_sandbox

# Discovery every second in the gateway (retry_interval_s bounds it), 5 instances in the sandbox:
# up to 50 tokens a second, so each measured batch stays within what one discovery hands out.
TOML = 'upstream.kind = "chutes"\nattestation.retry_interval_s = 1\n'
INSTANCES = "5"
SMALL_REQUESTS, SMALL_WARMUP = 40, 4
STREAMS = 8


def _paths() -> dict[str, TeegatePath]:
    plain = TeegatePath(TOML + "upstream.e2ee = false\n")
    sealed = TeegatePath(TOML + "upstream.e2ee = true\n")
    plain.name, plain.label = "chutes-plain", "teegate, Chutes, dcap (TLS to the front door)"
    sealed.name, sealed.label = "chutes-e2ee", "teegate, Chutes, dcap + E2EE"
    return {"plain": plain, "e2ee": sealed}


def _ready(url: str, key: str, timeout_s: float = 30.0) -> None:
    """Until the model is served (its instances verified), with a deadline."""
    base = url.rsplit("/v1/", 1)[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {key}"})
        if any(m["id"] == MODEL for m in resp.json().get("data", [])):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{MODEL} was never served by {base}")


def _measure(upstream: SandboxProc, kind: str, rounds: int, work: Path) -> dict[str, Any]:
    load = LoadGen(work)
    out: dict[str, Any] = {}
    running = {}
    try:
        for name, path in _paths().items():
            running[name] = path.start(upstream, work / f"{name}-{kind}", kind == "stream")
            _ready(running[name].url, running[name].key)
        for r in range(rounds):
            for name, target in running.items():
                log(f"chutes {kind} {name} ({r + 1}/{rounds})")
                time.sleep(1.2)  # the pool may discover again: a full batch of tokens
                if kind == "small":
                    res = load.run(
                        "small", target, concurrency=1, requests=SMALL_REQUESTS, warmup=SMALL_WARMUP
                    )
                else:
                    spread = (STREAM_CHUNKS - 1) * STREAM_DELAY_MS
                    res = load.run(
                        "stream",
                        target,
                        concurrency=STREAMS,
                        rounds=1,
                        expected_spread_ms=spread,
                        stagger_ms=spread,
                    )
                out.setdefault(name, []).append(res)
    finally:
        for t in running.values():
            t.stop()
    return out


def _best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return min(runs, key=lambda r: (r.get(key) or {}).get("p50", float("inf")))


def summary(small: dict[str, list], stream: dict[str, list]) -> dict[str, Any]:
    s = {n: _best(r, "latency_ms") for n, r in small.items()}
    t = {n: _best(r, "ttft_ms") for n, r in stream.items()}

    def diff(a: Any, b: Any) -> float | None:
        return None if a is None or b is None else round(b - a, 3)

    return {
        "per_request": {
            "latency_p50_ms": {n: s[n]["latency_ms"]["p50"] for n in s},
            "proxy_cpu_ms": {n: s[n].get("proxy_cpu_ms_per_request") for n in s},
            "errors": {
                n: s[n]["errors"] + sum(v for c, v in s[n]["statuses"].items() if c != "200")
                for n in s
            },
            "added_latency_p50_ms": diff(
                s["plain"]["latency_ms"]["p50"], s["e2ee"]["latency_ms"]["p50"]
            ),
            "added_proxy_cpu_ms": diff(
                s["plain"].get("proxy_cpu_ms_per_request"),
                s["e2ee"].get("proxy_cpu_ms_per_request"),
            ),
        },
        "per_stream": {
            "ttft_p50_ms": {n: t[n]["ttft_ms"]["p50"] for n in t},
            "inter_chunk_p50_ms": {n: t[n]["inter_chunk_ms"]["p50"] for n in t},
            "proxy_cpu_ms": {n: t[n].get("proxy_cpu_ms_per_request") for n in t},
            "buffered_streams": {n: t[n]["buffered_streams"] for n in t},
            "added_ttft_p50_ms": diff(t["plain"]["ttft_ms"]["p50"], t["e2ee"]["ttft_ms"]["p50"]),
            "added_proxy_cpu_ms": diff(
                t["plain"].get("proxy_cpu_ms_per_request"),
                t["e2ee"].get("proxy_cpu_ms_per_request"),
            ),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chutes_cost", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (best kept)")
    p.add_argument("--out", type=Path, help="where to write the JSON (default bench/results/)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="teegate-bench-chutes-") as tmp:
        work = Path(tmp)
        base = ("--upstream", "chutes", "--chutes-instances", INSTANCES)
        with start_sandbox(*base) as fast:
            small = _measure(fast, "small", args.rounds, work)
        slow_args = ("--chunks", str(STREAM_CHUNKS), "--chunk-delay-ms", str(STREAM_DELAY_MS))
        with start_sandbox(*base, *slow_args) as slow:
            stream = _measure(slow, "stream", args.rounds, work)
    doc = {"summary": summary(small, stream), "small": small, "stream": stream}
    print(json.dumps(doc["summary"], indent=2))
    out = args.out or Path(__file__).parent / "results" / time.strftime("chutes-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
