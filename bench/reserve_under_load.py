"""The reservation's wait on a busy event loop, with and without the express lane
(``python -m bench.reserve_under_load [--seconds 5] [--rounds 3]``).

Under concurrent streams a gateway's event loop spends most of each turn relaying chunks, and
every turn of the loop between a reservation's submit and its resume is paid in full. This
reproduces that in one process, without mitmproxy or other processes' noise in between: a
real :class:`~teegate.ledger.Ledger` on a temporary SQLite file (fsync on), ``--streams``
tasks that each wake every ``--chunk-ms`` and burn ``--work-us`` of CPU (a chunk relayed),
and as many requesters that reserve, hold the reservation for a stream's length and settle.
It reports the reservation's wait (call to return) and the loop's turn time, for the
reservation path as it is ("after") and as it was before session 6 ("before": a commit
started one loop iteration after its first submit), alternating in one process so that both
see the same machine. Tasks start eagerly, as in mitmproxy's loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import summarize
from bench.timeline_probe import defer_drain_start
from teegate.ledger import Ledger
from tests.support.ledger import PRICES, fund


def _before(on: bool) -> Any:
    """Switch the writer to the old path (returns a function that switches it back)."""
    return defer_drain_start() if on else (lambda: None)


async def _phase(led: Ledger, key: Any, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    stop = time.monotonic() + args.seconds
    waits: list[float] = []
    turns: list[float] = []
    work_s = args.work_us / 1e6

    async def relay() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(args.chunk_ms / 1000)
            end = time.perf_counter() + work_s
            while time.perf_counter() < end:
                pass

    async def requester(i: int) -> None:
        await asyncio.sleep(i * args.stream_s / args.streams)  # spread, like the harness
        n = 0
        while time.monotonic() < stop:
            t = time.perf_counter()
            res = await led.reserve(f"{tag}-{i}-{n}", key, "m", PRICES, 1000)
            waits.append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(args.stream_s)
            await led.settle(res, 10, 10, 0, "usage")
            n += 1

    async def ticker() -> None:
        while time.monotonic() < stop:
            t = time.perf_counter()
            await asyncio.sleep(0)
            turns.append((time.perf_counter() - t) * 1000)

    await asyncio.gather(
        *(relay() for _ in range(args.streams)),
        *(requester(i) for i in range(args.streams)),
        ticker(),
    )
    return {
        "reserve_wait_ms": summarize(waits),
        "loop_turn_ms": summarize(turns),
        "express_commits": led._writer.express_commits,
        "commits": led._writer.commits,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # as mitmproxy's
    out: dict[str, Any] = {"settings": vars(args) | {"out": None}, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="teegate-reserve-") as tmp:
        for r in range(args.rounds):
            row = {}
            for variant in ("before", "after"):
                restore = _before(variant == "before")
                led = await Ledger.open(
                    str(Path(tmp) / f"{variant}-{r}.sqlite3"), synchronous=args.sync
                )
                try:
                    f = await fund(led, "load", 10**12)
                    row[variant] = await _phase(led, f.key, args, f"{variant}{r}")
                finally:
                    await led.close()
                    restore()
                print(f"round {r + 1} {variant}: {json.dumps(row[variant])}", file=sys.stderr)
            out["rounds"].append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reserve_under_load")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--chunk-ms", type=float, default=20.0)
    p.add_argument("--work-us", type=float, default=60.0, help="CPU per relayed chunk")
    p.add_argument("--stream-s", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sync", choices=("FULL", "NORMAL"), default="FULL")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    print("| round | variant | reserve wait p50 ms | p90 | p99 | loop turn p50 ms | p90 | commits "
          "(express) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for i, row in enumerate(result["rounds"], 1):
        for variant, r in row.items():
            w, t = r["reserve_wait_ms"], r["loop_turn_ms"]
            print(
                f"| {i} | {variant} | {w['p50']} | {w['p90']} | {w['p99']} | {t['p50']} | "
                f"{t['p90']} | {r['commits']} ({r['express_commits']}) |"
            )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
