"""Process entry: listen, announce readiness, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from teegate.sandbox.app import make_app
from teegate.sandbox.options import Options, parse_options

SHUTDOWN_TIMEOUT_S = 2.0


def base_url(scheme: str, host: str, port: int) -> str:
    """The URL clients should use (a wildcard listen address is reached via loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"{scheme}://{host}:{port}"


def write_ready_file(path: Path, url: str, port: int) -> None:
    """Atomically, so a poller never reads a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"base_url": url, "port": port}), encoding="utf-8")
    os.replace(tmp, path)


async def serve(options: Options) -> None:
    ssl_ctx = None
    if options.tls_dir is not None:
        from teegate.sandbox.tls import (  # cryptography only when needed
            ensure_tls_files,
            server_context,
        )

        ssl_ctx = server_context(ensure_tls_files(options.tls_dir, options.tls_hostnames))
    app = make_app(options)
    access_log = web.access_logger if options.verbose else None
    runner = web.AppRunner(
        app, handle_signals=False, access_log=access_log, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.port, ssl_context=ssl_ctx, backlog=1024)
        await site.start()
        port = runner.addresses[0][1]
        url = base_url("https" if ssl_ctx else "http", options.host, port)
        if options.ready_file is not None:
            write_ready_file(options.ready_file, url, port)
        print(f"SANDBOX READY {url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    if options.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(serve(options))
    return 0
