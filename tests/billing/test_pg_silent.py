"""A PostgreSQL server that goes silent under a running gateway: 503 within the deadline.

The gateway reaches the session's test cluster through a forwarder that can stop relaying
while keeping its sockets open (:mod:`tests.support.silent_forwarder`), as a vanished host
or a network partition looks: without ``[ledger] statement_timeout_ms`` a request would wait
for the kernel to give up (~30 s). The ledger-level twin is tests/ledger/test_pg_silent.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import psycopg.conninfo
import pytest

from tests.support.accounts import create_account, create_key, teegate
from tests.support.clients import post_chat
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.postgres import Cluster
from tests.support.sandbox_proc import SandboxProc
from tests.support.silent_forwarder import SilentForwarder
from tests.support.testdata import TEE
from tests.support.wait import until

BODY = {"model": TEE, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}
DEADLINE_MS = 500
MARGIN_S = 2.0  # a loaded 2-core machine; far below the kernel's 30 s


@pytest.fixture(scope="module")
def pg_url(pg_cluster: Cluster) -> str:
    return pg_cluster.new_database("silent")


@pytest.fixture(scope="module")
def forwarder(pg_cluster: Cluster) -> Iterator[SilentForwarder]:
    with SilentForwarder(pg_cluster.socket_dir / ".s.PGSQL.5432") as fwd:
        yield fwd


@pytest.fixture(scope="module")
def gateway(
    upstream: SandboxProc, pg_url: str, forwarder: SilentForwarder
) -> Iterator[GatewayProc]:
    database = psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
    toml = (
        f'ledger.url = "{forwarder.url(database)}"\n'
        f"ledger.statement_timeout_ms = {DEADLINE_MS}\n"
    )
    with start_gateway(upstream.base_url, extra_toml=toml, balance_usd=None) as gw:
        yield gw


def _chat(gw: GatewayProc, key: str) -> httpx.Response:
    return post_chat(gw, key, BODY)


def test_a_silent_database_fails_requests_closed_within_the_deadline(
    gateway: GatewayProc, upstream: SandboxProc, forwarder: SilentForwarder, pg_url: str
) -> None:
    create_account(pg_url, "alice", "100")  # type: ignore[arg-type]
    cached = create_key(pg_url, "alice")  # type: ignore[arg-type]
    fresh = create_key(pg_url, "alice")  # type: ignore[arg-type]
    assert _chat(gateway, cached).status_code == 200
    seen = upstream.requests_seen()
    forwarder.silence()
    try:
        # The cached key's reservation, then a lookup of a key never seen: both unanswered.
        for key in (cached, fresh):
            started = time.monotonic()
            r = _chat(gateway, key)
            took = time.monotonic() - started
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "billing_unavailable"
            assert r.headers["x-should-retry"] == "true"
            assert took < DEADLINE_MS / 1000 + MARGIN_S, took
        # Nothing went upstream (the first answer's own signature check may, late).
        sent = [r["path"] for r in upstream.requests(since=seen)]
        assert all(p.startswith("/v1/signature/") for p in sent), sent
    finally:
        forwarder.resume()
    until(lambda: _chat(gateway, fresh).status_code == 200, "serving again", timeout=20)
    code, out, err = teegate("ledger", "verify", "--db", pg_url)
    assert code == 0, out + err
    log = gateway.log_text()
    assert "ledger.deadline_passed" in log and cached not in log and fresh not in log
