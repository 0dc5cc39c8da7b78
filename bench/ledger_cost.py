"""What the ledger costs per request (reserve + settle), measured, not asserted.

Usage::

    .venv/bin/python -m bench.ledger_cost [--requests N] [--dir PATH] [--postgres URL]

For each configuration it runs N requests -- ``reserve`` (awaited: committed)
then ``settle`` (queued) -- first one at a time (the latency a lone request
pays) and then from 64 concurrent tasks (what group commit buys under load),
and prints wall time per request, reserve latency percentiles, process CPU
per request, and how many requests shared each commit. The database lives in
``--dir`` (default: bench/results/, on the real disk: tmpfs would make fsync
free and the numbers meaningless). ``--postgres URL`` measures the PostgreSQL
store on that database as well (its accounts are left behind; use a scratch one).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from teegate.ledger import Ledger, Prices

PRICES = Prices(280_000, 420_000)


@dataclass
class Result:
    label: str
    requests: int
    wall_s: float
    cpu_s: float
    commits: int
    reserve_ms: list[float]
    db_cpu_s: float | None = None
    """PostgreSQL's own CPU (every server process, read from /proc: a server on this machine)."""

    def line(self) -> str:
        lat = sorted(self.reserve_ms)
        p50 = lat[len(lat) // 2]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (
            f"{self.label:<34} {self.wall_s / self.requests * 1e6:9.0f} us/req wall "
            f"{self.cpu_s / self.requests * 1e6:7.0f} us/req cpu  "
            f"reserve p50 {p50:6.2f} ms p99 {p99:6.2f} ms  "
            f"{self.requests / max(self.commits, 1):5.1f} req/commit"
            + (
                f"  database {self.db_cpu_s / self.requests * 1e6:5.0f} us/req cpu"
                if self.db_cpu_s is not None
                else ""
            )
        )


def _server_cpu(url: str) -> float | None:
    """CPU seconds used so far by the PostgreSQL server's processes, when they run here."""
    import os

    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity")]
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None  # not on this machine
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def _one(led: Ledger, key: object, i: int, lat: list[float]) -> None:
    t0 = time.perf_counter()
    res = await led.reserve(f"bench-{i}", key, "m", PRICES, 10_000)  # type: ignore[arg-type]
    lat.append((time.perf_counter() - t0) * 1000)
    await led.settle(res, 1200, 300, 0, "usage")


async def run(path: Path | str, label: str, n: int, concurrency: int, **opts: object) -> Result:
    led = await Ledger.open(path, **opts)  # type: ignore[arg-type]
    try:
        acct = await led.create_account(f"bench-{time.time_ns()}", topup_micro=10**12)
        key, _ = await led.create_key(acct.id)
        await led.flush()
        lat: list[float] = []
        pg = str(path).startswith("postgres")
        db0 = _server_cpu(str(path)) if pg else None
        commits0 = led._writer.commits
        cpu0, t0 = time.process_time(), time.perf_counter()
        if concurrency == 1:
            for i in range(n):
                await _one(led, key, i, lat)
        else:
            queue = iter(range(n))

            async def worker() -> None:
                for i in queue:
                    await _one(led, key, i, lat)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        await led.flush()  # settlements included in the cost
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        commits = led._writer.commits - commits0
        db1 = _server_cpu(str(path)) if pg else None
        report = await led.verify()
        assert report.ok and not report.open_reservations
    finally:
        await led.close()
    db_cpu = db1 - db0 if db0 is not None and db1 is not None else None
    return Result(label, n, wall, cpu, commits, lat, db_cpu)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--postgres", metavar="URL", help="also measure this PostgreSQL ledger")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        print(f"{args.requests} requests each; database in {work}")
        for sync in ("FULL", "NORMAL"):
            for batch_ms in (0.0, 2.0):
                for conc in (1, 64):
                    n = args.requests if conc > 1 else max(200, args.requests // 4)
                    label = f"sync={sync:<6} batch_ms={batch_ms:<3} conc={conc}"
                    db = work / f"{sync}-{batch_ms}-{conc}.sqlite3"  # a fresh file per run
                    r = await run(db, label, n, conc, synchronous=sync, batch_ms=batch_ms)
                    print(r.line(), flush=True)
        if args.postgres:
            for conc in (1, 64):
                n = args.requests if conc > 1 else max(200, args.requests // 4)
                r = await run(args.postgres, f"postgresql conc={conc}", n, conc)
                print(r.line(), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
