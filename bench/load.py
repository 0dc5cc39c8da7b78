"""The load generator: ``python -m bench.load small|stream ...``, one JSON object on stdout.

It runs in its own process so that its CPU time is never counted inside the proxy under test,
and it speaks HTTP/1.1 itself (a few dozen lines over asyncio streams, keep-alive connections,
``Content-Length`` and chunked bodies) because general-purpose clients such as httpx spend more
time per request than the proxies being measured, which would flatten every difference.

``small``: a fixed number of identical POSTs shared by ``--concurrency`` connections, after a
warm-up, stopped early at ``--time-limit``; reports requests/second and latency percentiles.

``stream``: ``--concurrency`` connections each running ``--rounds`` streams one after the other,
their first streams spread over ``--stagger-ms`` so that that many streams are in flight at once;
reports time to first byte (first SSE event), time to first token (first event carrying a
non-empty ``content`` delta), inter-chunk delay between consecutive content events, and how
many streams arrived *buffered* (their events spread over less than half the time the upstream
took to write them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.stats import summarize

_TOKEN = re.compile(rb'"content":\s*"[^"]')


class HTTPError(Exception):
    """A malformed or truncated response: the connection is dropped and counted."""


@dataclass
class Target:
    host: str
    port: int
    path: str
    headers: bytes  # the request head, ready to send except for the body

    @classmethod
    def make(cls, url: str, key: str, body: bytes) -> Target:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        head = (
            f"POST {parts.path} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            "Content-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "\r\n"
        ).encode()
        return cls(host, port, parts.path, head + body)


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened after the server closes it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.error_code = ""  # the envelope's code of the last error answer, for the tally

    async def _ensure(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(
                self.target.host, self.target.port, limit=1 << 20
            )
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, on_data: Any = None) -> int:
        """Send the request, read the whole response; ``on_data(bytes)`` sees each body piece
        as it arrives. Returns the status code."""
        reader, writer = await self._ensure()
        writer.write(self.target.headers)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self.close()
            raise HTTPError("connection closed before the response head") from e
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length: int | None = None
        chunked = False
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        self.error_code = ""
        if status >= 400:  # keep the body: the tally says which refusal it was
            kept: list[bytes] = []
            on_data = kept.append
        try:
            if chunked:
                await _read_chunked(reader, on_data)
            elif length is not None:
                data = await reader.readexactly(length)
                if on_data is not None:
                    on_data(data)
            else:  # body ends with the connection
                while data := await reader.read(65536):
                    if on_data is not None:
                        on_data(data)
                close = True
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
            self.close()
            raise HTTPError("truncated body") from e
        if close:
            self.close()
        if status >= 400:
            self.error_code = _error_code(b"".join(kept))
        return status


def _error_code(body: bytes) -> str:
    try:
        err = json.loads(body).get("error") or {}
        return str(err.get("code") or err.get("type") or "")[:64]
    except (ValueError, AttributeError):
        return ""


async def _read_chunked(reader: asyncio.StreamReader, on_data: Any) -> None:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return
        data = await reader.readexactly(size + 2)
        if on_data is not None:
            on_data(data[:-2])


@dataclass
class Outcome:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    def status(self, code: int, error_code: str = "") -> None:
        key = f"{code} {error_code}" if error_code else str(code)
        self.statuses[key] = self.statuses.get(key, 0) + 1


async def _small(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    async def phase(total: int, deadline: float, out: Outcome) -> float:
        remaining = total
        conns = [Connection(target) for _ in range(args.concurrency)]

        async def worker(conn: Connection) -> None:
            nonlocal remaining
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                t0 = time.perf_counter()
                try:
                    code = await conn.request()
                except (HTTPError, OSError):
                    out.errors += 1
                    continue
                out.latencies_ms.append((time.perf_counter() - t0) * 1000)
                out.status(code, conn.error_code)
            conn.close()

        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        return time.perf_counter() - start

    await phase(args.warmup, time.monotonic() + args.time_limit, Outcome())
    out = Outcome()
    elapsed = await phase(args.requests, time.monotonic() + args.time_limit, out)
    done = len(out.latencies_ms)
    return {
        "kind": "small",
        "concurrency": args.concurrency,
        "requests": done,
        "errors": out.errors,
        "statuses": out.statuses,
        "elapsed_s": round(elapsed, 3),
        "rps": round(done / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": summarize(out.latencies_ms),
    }


@dataclass
class StreamTrace:
    """Arrival times of one stream's SSE events."""

    start: float
    first_event: float | None = None
    first_token: float | None = None
    events_after_token: list[float] = field(default_factory=list)
    _buf: bytes = b""

    def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        self._buf += data
        while (i := self._buf.find(b"\n\n")) >= 0:
            event, self._buf = self._buf[:i], self._buf[i + 2 :]
            if self.first_event is None:
                self.first_event = now
            if self.first_token is None:
                if _TOKEN.search(event):
                    self.first_token = now
                    self.events_after_token.append(now)
            elif _TOKEN.search(event):
                self.events_after_token.append(now)


async def _stream(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    traces: list[StreamTrace] = []
    out = Outcome()
    deadline = time.monotonic() + args.time_limit

    async def worker(conn: Connection, rounds: int, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        for _ in range(rounds):
            if time.monotonic() >= deadline:
                break
            trace = StreamTrace(start=time.perf_counter())
            try:
                code = await conn.request(trace.feed)
            except (HTTPError, OSError):
                out.errors += 1
                continue
            out.status(code, conn.error_code)
            if code == 200:
                traces.append(trace)
        conn.close()

    # Warm-up: a few streams so that catalogs, pools and caches are in place.
    await asyncio.gather(*(worker(Connection(target), 1) for _ in range(min(args.concurrency, 4))))
    traces.clear()
    out = Outcome()
    start = time.perf_counter()
    # Staggered starts: N streams in flight at once, not N requests in the same millisecond
    # (that burst measures request throughput, which the small-request figures already do).
    step = args.stagger_ms / 1000 / args.concurrency
    await asyncio.gather(
        *(worker(Connection(target), args.rounds, i * step) for i in range(args.concurrency))
    )
    elapsed = time.perf_counter() - start
    ttfb = [(t.first_event - t.start) * 1000 for t in traces if t.first_event is not None]
    ttft = [(t.first_token - t.start) * 1000 for t in traces if t.first_token is not None]
    gaps: list[float] = []
    buffered = 0
    expected_spread = args.expected_spread_ms
    for t in traces:
        ev = t.events_after_token
        gaps.extend((b - a) * 1000 for a, b in zip(ev, ev[1:], strict=False))
        if expected_spread and ev and (ev[-1] - ev[0]) * 1000 < expected_spread / 2:
            buffered += 1
    return {
        "kind": "stream",
        "concurrency": args.concurrency,
        "stagger_ms": args.stagger_ms,
        "streams": len(traces),
        "errors": out.errors,
        "statuses": out.statuses,
        "no_token": len(traces) - len(ttft),
        "buffered_streams": buffered,
        "elapsed_s": round(elapsed, 3),
        "ttfb_ms": summarize(ttfb),
        "ttft_ms": summarize(ttft),
        "inter_chunk_ms": summarize(gaps),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=("small", "stream"))
    p.add_argument("--url", required=True, help="http://HOST:PORT/v1/chat/completions")
    p.add_argument("--key", required=True, help="bearer key to send")
    p.add_argument("--body-file", type=Path, required=True, help="the JSON request body")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=1000, help="small: measured requests")
    p.add_argument("--warmup", type=int, default=100, help="small: unmeasured requests first")
    p.add_argument("--rounds", type=int, default=1, help="stream: streams per connection")
    p.add_argument(
        "--expected-spread-ms",
        type=float,
        default=0.0,
        help="stream: first-to-last token time the upstream takes (buffering check)",
    )
    p.add_argument(
        "--stagger-ms",
        type=float,
        default=0.0,
        help="stream: spread the connections' first streams over this long",
    )
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per phase, at most")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = Target.make(args.url, args.key, args.body_file.read_bytes())
    run = _small if args.kind == "small" else _stream
    result = asyncio.run(run(args, target))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
