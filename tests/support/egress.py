"""The egress tests' stand-ins for the internet, and what they read back from the gateway.

127.0.0.3 is on the gateway's LLM host list, 127.0.0.5 is listed and audited, 127.0.0.4 is
not listed (see tests/egress/conftest.py for the processes behind them).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.support.accounts import balance_micro
from tests.support.billing import open_reservations
from tests.support.gateway_proc import GatewayProc
from tests.support.sandbox_proc import SandboxProc, start_sandbox
from tests.support.testdata import REPO_ROOT, TEST_MODELS

LISTED, AUDITED, UNLISTED = "127.0.0.3", "127.0.0.5", "127.0.0.4"


def start_tls_sandbox(tls_dir: Path, host: str = "127.0.0.1") -> SandboxProc:
    """A sandbox serving HTTPS with the test CA in ``tls_dir`` (made on first use)."""
    # Every TLS sandbox asks for the same names, so none re-issues another's certificate.
    names = [a for n in (LISTED, AUDITED, UNLISTED) for a in ("--tls-hostname", n)]
    return start_sandbox(
        "--host", host, "--models", str(TEST_MODELS), "--tls-dir", str(tls_dir), *names
    )


def gateway_ca_path(gateway: GatewayProc) -> Path:
    """The egress CA as ``teegate ca path`` reports it for the gateway's own proxy.toml."""
    out = subprocess.run(
        [sys.executable, "-m", "teegate", "ca", "path", "-c", str(gateway.config_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        timeout=30,
    )
    return Path(out.stdout.strip())


def balance(gw: GatewayProc) -> int:
    """The test account's balance, micro-USD, read with the operator command line."""
    return balance_micro(gw.db, "test")


def wait_for_balance_change(gw: GatewayProc, before: int, timeout: float = 10.0) -> int:
    """Poll (with a deadline) until a charge has landed and nothing is still held for a
    request in flight (settlements are committed shortly after the response); return how
    much was charged."""
    deadline = time.monotonic() + timeout
    while (now := balance(gw)) == before or open_reservations(gw.db):
        if time.monotonic() > deadline:
            raise AssertionError("no charge landed")
        time.sleep(0.05)
    return before - now


def log_events(gw: GatewayProc) -> list[dict[str, Any]]:
    events = []
    for line in gw.log_text().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def wait_for_event(
    gw: GatewayProc, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """Poll the gateway's log (another process) until a line matches, with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in log_events(gw):
            if match(event):
                return event
        time.sleep(0.05)
    raise AssertionError("no matching log line")


def connect_tunnel(gateway: GatewayProc, host: str, port: int) -> socket.socket:
    """A CONNECT tunnel through the egress listener, as HTTPS_PROXY clients open one."""
    proxy = urlsplit(gateway.urls["egress"])
    s = socket.create_connection((proxy.hostname, proxy.port), timeout=10)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, "proxy closed the connection during CONNECT"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return s
