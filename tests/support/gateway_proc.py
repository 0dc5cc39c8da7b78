"""Start the gateway (``python -m teegate run``) as a real subprocess, for tests and tools.

The gateway writes its JSON log lines (stderr) to ``gateway.log`` in its workdir, and every
stdout line is appended to ``stdout.log`` there, so tests can assert what was (and was not)
written anywhere: :meth:`GatewayProc.output_text` returns both.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.accounts import create_account, create_key
from tests.support.attestation import attestation_toml
from tests.support.wait import until

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_PREFIX = "TEEGATE READY "
# A start is ~2 s of CPU (mostly imports), but the suite runs on 2 shared cores (and under
# pytest-xdist): at a load average of 9, 20 s was seen to run out. Only a failing start waits
# this long; a good one returns at its "TEEGATE RUNNING" line.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class GatewayStartError(RuntimeError):
    pass


class GatewayProc:
    def __init__(
        self,
        process: subprocess.Popen[str],
        urls: dict[str, str],
        workdir: Path,
        api_key: str | None,
    ) -> None:
        self.process = process
        self.urls = urls  # {"reverse": "http://127.0.0.1:PORT", "egress": ..., "admin": ...}
        self.workdir = workdir
        self.log_path = workdir / "gateway.log"
        self.stdout_path = workdir / "stdout.log"
        self.config_path = workdir / "proxy.toml"
        self.db = workdir / "teegate.sqlite3"  # the default ledger path, beside proxy.toml
        self.api_key = api_key  # a funded key of account "test", when provisioned

    @property
    def base_url(self) -> str:
        return self.urls["reverse"]

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def access_line(
        self, request_id: str, timeout: float = 15.0, *, event: str = "request"
    ) -> dict[str, Any]:
        """The one log line of ``event`` (the access log's, unless named) for ``request_id``,
        waited for (it may trail the answer)."""

        def found() -> list[dict[str, Any]]:
            lines = (json.loads(x) for x in self.log_text().splitlines() if request_id in x)
            return [e for e in lines if e.get("event") == event]

        (line,) = until(found, f"the {event} line of {request_id}", timeout)
        return line

    def stdout_text(self) -> str:
        """Every stdout line so far (appended by the reader thread as it arrives)."""
        try:
            return self.stdout_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def output_text(self) -> str:
        """Everything the gateway wrote: its stderr log, then its stdout."""
        return self.log_text() + "\n" + self.stdout_text()

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the crash case, nothing flushed."""
        self.process.kill()
        self.process.wait()

    def __enter__(self) -> GatewayProc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def write_config(
    workdir: Path,
    upstream_url: str,
    upstream_key: str,
    extra_toml: str = "",
    attestation: str = "sandbox",
) -> Path:
    """A proxy.toml on free ports; ``extra_toml`` may add keys to any table (TOML dotted keys).

    The egress and admin listeners also get free ports, and the CA a directory in ``workdir``
    (never the user's ~/.teegate), unless ``extra_toml`` sets them itself.
    """
    defaults = ""
    if not re.search(r"^\s*listen\.egress\s*=", extra_toml, re.M):
        # Another loopback address: mitmproxy refuses two listeners both spelled "127.0.0.1:0".
        defaults += 'listen.egress = "127.0.0.2:0"\n'
    if not re.search(r"^\s*(admin\.listen\s*=|\[admin\])", extra_toml, re.M):
        # A free port: several gateways run at once, and 8082 may be anyone's.
        defaults += 'admin.listen = "127.0.0.1:0"\n'
    if not re.search(r"^\s*(egress\.confdir\s*=|\[egress\])", extra_toml, re.M):
        defaults += f'egress.confdir = "{workdir / "ca"}"\n'
    # dcap against the sandbox's test root unless asked otherwise: tests/support/attestation.py
    defaults += attestation_toml(workdir, upstream_url, extra_toml, attestation)
    text = (
        f'upstream.base_url = "{upstream_url}"\n'
        f'upstream.api_key = "{upstream_key}"\n'
        'listen.reverse = "127.0.0.1:0"\n'
        f"{defaults}"
        f"{extra_toml}\n"
    )
    path = workdir / "proxy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def start_gateway(
    upstream_url: str,
    upstream_key: str = "sandbox-upstream-key",
    *,
    extra_toml: str = "",
    workdir: Path | None = None,
    env: dict[str, str] | None = None,
    module: str = "teegate",
    args: tuple[str, ...] = (),
    balance_usd: str | None = "100",
    attestation: str = "sandbox",
    start_timeout: float = START_TIMEOUT_S,
) -> GatewayProc:
    """Start the gateway and wait (bounded) until every listener is bound.

    Unless ``balance_usd`` is None, a fresh workdir's ledger gets an account "test" with
    that balance and one key (``.api_key``), made with the operator command line.
    """
    fresh = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="teegate-test-"))
    config = workdir / "proxy.toml"
    write_config(workdir, upstream_url, upstream_key, extra_toml, attestation)
    api_key = None
    if fresh and balance_usd is not None:
        db = workdir / "teegate.sqlite3"
        create_account(db, "test", balance_usd)
        api_key = create_key(db, "test")
    log = open(workdir / "gateway.log", "a", encoding="utf-8")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "run", "-c", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",  # a stray byte must not end the reader thread
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
    )
    log.close()
    lines: queue.Queue[str | None] = queue.Queue()

    stdout_log = workdir / "stdout.log"

    def pump() -> None:
        # Reads stdout to its end (so the gateway never blocks on a full pipe) and keeps every
        # line in stdout.log, flushed per line so a test reads what was written so far.
        assert proc.stdout is not None
        with open(stdout_log, "a", encoding="utf-8") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    urls: dict[str, str] = {}
    deadline = time.monotonic() + start_timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(remaining, 0.01))
        except queue.Empty:
            line = ""
        if line is None or remaining <= 0:
            proc.kill()
            tail = (workdir / "gateway.log").read_text()[-3000:]
            raise GatewayStartError(f"gateway did not become ready; log:\n{tail}")
        if line.startswith(READY_PREFIX):
            kind, url = line[len(READY_PREFIX) :].split()
            urls[kind] = url
        elif line == "TEEGATE RUNNING":
            return GatewayProc(proc, urls, workdir, api_key)
