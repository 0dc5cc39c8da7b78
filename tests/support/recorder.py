"""A recording pass-through, run as its own process between the gateway and the sandbox.

It writes down exactly what reached "the upstream": method, raw request target (path and
query, as sent), headers and body of every request; then forwards the request to the sandbox
and streams the answer back piece by piece, so catalog, attestation and chat keep working.

``python -m tests.support.recorder --to http://127.0.0.1:PORT`` prints ``RECORDER READY <url>``;
``GET /_recorder/log`` returns the records, ``POST /_recorder/reset`` clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from aiohttp import ClientSession, web
from yarl import URL

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = "RECORDER READY "
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def make_app(to: str) -> web.Application:
    records: list[dict[str, Any]] = []
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def log(_: web.Request) -> web.Response:
        return web.json_response(records)

    async def reset(_: web.Request) -> web.Response:
        records.clear()
        return web.json_response({})

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        records.append(
            {
                "method": request.method,
                "target": request.raw_path,
                "path": request.path,
                "query": request.query_string,
                "headers": [[k.lower(), v] for k, v in request.headers.items()],
                "body": body.decode("utf-8", "replace"),
            }
        )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        session: ClientSession = app["session"]
        url = URL(to + request.raw_path, encoded=True)
        async with session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as up:
            out = web.StreamResponse(
                status=up.status,
                headers={k: v for k, v in up.headers.items() if k.lower() not in _HOP},
            )
            await out.prepare(request)
            async for piece in up.content.iter_any():
                await out.write(piece)
            await out.write_eof()
            return out

    async def session_ctx(app: web.Application):
        app["session"] = ClientSession(auto_decompress=False)
        yield
        await app["session"].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/_recorder/log", log)
    app.router.add_post("/_recorder/reset", reset)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def _main(to: str) -> None:
    runner = web.AppRunner(make_app(to))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"{READY}http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


class Recorder:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=f"{base_url}/_recorder", timeout=10)

    def records(self) -> list[dict[str, Any]]:
        return self._http.get("/log").raise_for_status().json()

    def chats(self) -> list[dict[str, Any]]:
        """Records that reached the chat endpoint, however spelled."""
        return [r for r in self.records() if "chat" in r["target"]]

    def reset(self) -> None:
        self._http.post("/reset").raise_for_status()

    def close(self) -> None:
        self._http.close()


@contextmanager
def start_recorder(to: str) -> Iterator[Recorder]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.recorder", "--to", to],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the process prints it or exits
        if not line.startswith(READY):
            raise RuntimeError(f"recorder failed to start: {line!r}")
        rec = Recorder(line[len(READY) :].strip())
        try:
            yield rec
        finally:
            rec.close()
    finally:
        proc.terminate()
        proc.wait(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--to", required=True)
    asyncio.run(_main(parser.parse_args().to))
