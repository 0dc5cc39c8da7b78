"""``teegate run --workers N`` (teegate/supervisor.py), as real processes: the SQLite ledger
refuses more than one worker, a killed worker is replaced on the same port, and SIGTERM lets a
stream in flight finish before every process stops.

With SQLite these run one supervised worker; requests reaching several workers need the
PostgreSQL ledger (tests for it come with that store)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gateway_proc import REPO_ROOT, GatewayProc, start_gateway, write_config
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE
from tests.support.wait import until

MSG = [{"role": "user", "content": "hi"}]


def _teegate_run(*args: str, extra_toml: str = "") -> subprocess.CompletedProcess[str]:
    workdir = Path(tempfile.mkdtemp(prefix="teegate-test-"))
    config = write_config(workdir, "http://127.0.0.1:9", "k", extra_toml, attestation="flag")
    return subprocess.run(
        [sys.executable, "-m", "teegate", "run", "-c", str(config), *args],
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


@pytest.mark.parametrize(
    ("args", "toml"), [(("--workers", "2"), ""), ((), "workers.count = 2")], ids=["flag", "toml"]
)
def test_sqlite_ledger_refuses_more_than_one_worker(args, toml):
    done = _teegate_run(*args, extra_toml=toml)
    assert done.returncode == 2
    assert "SQLite ledger" in done.stderr and 'ledger.url = "postgresql://' in done.stderr
    assert "TEEGATE READY" not in done.stdout  # nothing was started


def _workers(gw: GatewayProc) -> list[int]:
    pid = gw.process.pid
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _chat(gw: GatewayProc) -> httpx.Response:
    return httpx.post(
        f"{gw.api_base}/chat/completions",
        json={"model": TEE, "messages": MSG},
        headers={"authorization": f"Bearer {gw.api_key}", "connection": "close"},
        timeout=30,
    )


@pytest.fixture(scope="module")
def supervised(upstream: SandboxProc) -> Iterator[GatewayProc]:
    # A supervisor starts its worker after its own start: more time on a loaded machine.
    with start_gateway(upstream.base_url, args=("--workers", "1"), start_timeout=60) as gw:
        yield gw


def test_a_killed_worker_is_replaced_on_the_same_port(supervised: GatewayProc):
    assert _chat(supervised).status_code == 200
    (first,) = _workers(supervised)
    os.kill(first, signal.SIGKILL)

    def served_by_a_new_worker() -> bool:
        if _workers(supervised) in ([], [first]):
            return False
        try:
            return _chat(supervised).status_code == 200
        except httpx.HTTPError:
            return False

    until(served_by_a_new_worker, "a replacement worker serving", timeout=60)
    assert supervised.process.poll() is None
    assert '"event": "worker_exited"' in supervised.log_text()


def test_sigterm_lets_a_stream_in_flight_finish_then_stops_every_process(
    supervised: GatewayProc, upstream: SandboxProc
):
    workers = _workers(supervised)
    upstream.behaviour(hold_after_chunks=2)
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{supervised.api_base}/chat/completions",
            json={"model": TEE, "messages": MSG, "stream": True},
            headers={"authorization": f"Bearer {supervised.api_key}"},
            timeout=60,
        ) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data:"):
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert started.wait(30), "no first chunk"
        supervised.process.send_signal(signal.SIGTERM)
        until(lambda: '"event": "draining"' in supervised.log_text(), "the worker draining")
        with pytest.raises(httpx.ConnectError):  # no longer listening: no new requests
            _chat(supervised)
        assert supervised.process.poll() is None  # still waiting for the stream
    finally:
        upstream.release()
        reader.join(30)
    assert [x for x in lines if x][-1] == "data: [DONE]"  # the stream in flight finished whole
    assert supervised.process.wait(30) == 0
    assert not [p for p in workers if Path(f"/proc/{p}").exists()]
    assert '"event": "drained"' in supervised.log_text()


def test_a_postgresql_ledger_allows_several_workers(monkeypatch):
    from teegate.config import Settings
    from teegate.supervisor import _addresses, refusal

    assert refusal(Settings(), 1) is None
    assert "SQLite" in (refusal(Settings(), 3) or "")
    monkeypatch.setenv("TEEGATE_DB", "postgresql://gw@/teegate?host=/run/pg")
    assert refusal(Settings(), 3) is None
    lines = [
        "TEEGATE READY reverse http://127.0.0.1:8080",
        "TEEGATE READY egress http://[::1]:8081",
        "TEEGATE READY admin http://127.0.0.1:8082",  # not a shared mitmproxy listener
    ]
    assert _addresses(lines) == {"reverse": "127.0.0.1:8080", "egress": "[::1]:8081"}
