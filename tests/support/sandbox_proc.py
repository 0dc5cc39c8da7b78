"""Start the sandbox upstream (``python -m teegate.sandbox``) as a subprocess, for tests and tools.

A real process, not an in-process app: the gateway talks to it over TCP exactly as it would to the
real upstream, and a crash or hang in one side cannot hide inside the other's event loop.
"""

from __future__ import annotations

import os
import queue
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from teegate.sandbox.options import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_PREFIX = "SANDBOX READY "
START_TIMEOUT_S = 60.0  # a bound for a loaded machine: see tests/support/gateway_proc.py
STOP_TIMEOUT_S = 5.0


class SandboxStartError(RuntimeError):
    """The sandbox did not announce readiness in time (or died first)."""


class SandboxProc:
    """A running sandbox process: its address, its control endpoints, and how to stop it."""

    def __init__(
        self,
        process: subprocess.Popen[str],
        base_url: str,
        api_key: str,
        ca_file: Path | None,
    ) -> None:
        self.process = process
        self.base_url = base_url  # e.g. "http://127.0.0.1:PORT" (no /v1)
        self.port = int(base_url.rsplit(":", 1)[1])
        self.api_key = api_key
        self.ca_file = ca_file  # the test CA when serving HTTPS, else None
        self._control: httpx.Client | None = None

    @property
    def api_base(self) -> str:
        """The OpenAI-style base URL (``.../v1``)."""
        return f"{self.base_url}/v1"

    def verify(self) -> ssl.SSLContext | bool:
        """What to pass as httpx's ``verify=``: the test CA's context when serving HTTPS."""
        if self.ca_file is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_file))

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client for the API (``/v1``), carrying the upstream key; caller closes it."""
        headers = {"Authorization": f"Bearer {self.api_key}", **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.api_base, headers=headers, verify=self.verify(), **kwargs)

    def _control_client(self) -> httpx.Client:
        if self._control is None:
            self._control = httpx.Client(
                base_url=f"{self.base_url}/_sandbox", verify=self.verify(), timeout=10.0
            )
        return self._control

    def stats(self, since: int = 0) -> dict[str, Any]:
        """Counters and records since the last reset.

        ``{"total", "by_route", "chat": [{"headers", "body"}, ...], "requests", "requests_seen"}``
        (``requests``: see :meth:`requests`).
        """
        response = self._control_client().get("/stats", params={"since": since})
        response.raise_for_status()
        return response.json()

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        """Every non-control request the sandbox received since the last reset, oldest first;
        with ``since``, only those after the ``since``-th (see :meth:`requests_seen`).

        Each: ``method``, ``target`` (raw path and query), ``path``, ``query`` (raw, None when
        the target had no ``?``), ``version``, ``headers`` (``[name, value]`` pairs as received),
        ``body_size``, ``body_b64``, ``body_text`` (None unless UTF-8), ``body_truncated``,
        ``json_ok`` and ``json`` (the parsed body). Raises if the bounded record dropped any.
        """
        stats = self.stats(since)
        recorded = stats["requests"]
        expected = stats["requests_seen"] - since
        if len(recorded) != expected:
            raise AssertionError(f"the sandbox kept {len(recorded)} of {expected} requests")
        return recorded

    def requests_seen(self) -> int:
        """How many non-control requests arrived since the last reset (a ``since`` mark)."""
        return self.stats(since=2**62)["requests_seen"]

    def behaviour(self, **switches: Any) -> dict[str, Any]:
        """Merge ``switches`` into the current behaviour; returns the whole new behaviour."""
        response = self._control_client().post("/behaviour", json=switches)
        response.raise_for_status()
        return response.json()

    def release(self) -> None:
        """Let streams held by ``hold_after_chunks`` continue."""
        self._control_client().post("/release").raise_for_status()

    def reset(self) -> None:
        """Default behaviour (as given on the command line) and every counter back to zero."""
        self._control_client().post("/reset").raise_for_status()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait; SIGKILL if it will not go. Returns the exit code."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> SandboxProc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _read_ready_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The base URL from the READY line, waiting at most ``timeout`` seconds."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        lines.put(process.stdout.readline())

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise SandboxStartError(f"sandbox not ready within {timeout:.0f}s") from None
    if not line.startswith(READY_PREFIX):
        raise SandboxStartError(f"sandbox failed to start (exit {process.poll()}): {line!r}")
    return line[len(READY_PREFIX) :].strip()


def start_sandbox(
    *args: str, env: dict[str, str] | None = None, timeout: float = START_TIMEOUT_S
) -> SandboxProc:
    """Launch ``python -m teegate.sandbox --port 0 *args`` and return once it is listening."""
    options = build_parser().parse_args(["--port", "0", *args])
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "teegate.sandbox", "--port", "0", *args],
        cwd=REPO_ROOT,
        env=child_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = _read_ready_line(process, timeout)
    except BaseException:
        process.kill()
        process.wait()
        raise
    ca_file = options.tls_dir / "ca.pem" if options.tls_dir is not None else None
    return SandboxProc(process, base_url, options.api_key, ca_file)
