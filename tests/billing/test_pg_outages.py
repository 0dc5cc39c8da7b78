"""A PostgreSQL ledger that goes away and comes back while the gateway runs.

The module owns its cluster (the session's serves other modules), so it can stop and start
the server: a restart or failover as the gateway sees it, every session ended at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import ledgerdb
from tests.support.accounts import create_account, create_key, teegate
from tests.support.clients import post_chat
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.postgres import Cluster, cluster_or_fail
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE
from tests.support.wait import until

BODY = {"model": TEE, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[Cluster]:
    with cluster_or_fail() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pg_url(own_cluster: Cluster) -> str:
    return own_cluster.new_database("outage")


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc, pg_url: str) -> Iterator[GatewayProc]:
    toml = f'ledger.url = "{pg_url}"\nledger.sweep_interval_s = 0.2\n'
    with start_gateway(upstream.base_url, extra_toml=toml, balance_usd=None) as gw:
        yield gw


def _chat(gw: GatewayProc, key: str) -> httpx.Response:
    return post_chat(gw, key, BODY)


def test_a_database_restart_fails_closed_then_serves_again_without_a_gateway_restart(
    gateway: GatewayProc, upstream: SandboxProc, own_cluster: Cluster, pg_url: str
) -> None:
    create_account(pg_url, "alice", "100")  # type: ignore[arg-type]
    key = create_key(pg_url, "alice")  # type: ignore[arg-type]
    auth = {"authorization": f"Bearer {key}"}
    assert _chat(gateway, key).status_code == 200
    upstream.behaviour(hold_after_chunks=1)
    with httpx.Client(timeout=30) as c:
        body = {**BODY, "stream": True}
        url = f"{gateway.api_base}/chat/completions"
        with c.stream("POST", url, json=body, headers=auth) as held:  # in flight throughout
            assert held.status_code == 200
            rid = held.headers["x-request-id"]
            chunks = held.iter_bytes()
            next(chunks)
            seen = upstream.requests_seen()
            own_cluster.stop("fast")
            try:
                # The database is gone: refused, retryable, nothing sent upstream, whether
                # the key is still cached (the reservation fails) or not (the lookup fails).
                for _ in range(3):
                    r = _chat(gateway, key)
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "billing_unavailable"
                    assert r.headers["x-should-retry"] == "true"
                models = c.get(f"{gateway.api_base}/models", headers=auth)  # counted, not billed
                assert models.status_code == 503, models.text
                upstream.release()
                upstream.behaviour(hold_after_chunks=None)
                rest = b"".join(chunks)  # the answer ends; its settlement awaits the database
                assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]
                # Only the held answer's own signature check went out after the stop.
                sent = [r["path"] for r in upstream.requests(since=seen)]
                assert all(p.startswith("/v1/signature/") for p in sent), sent
            finally:
                own_cluster.start()
    # Back without restarting the gateway (reconnect back-off is at most 2 s).
    until(lambda: _chat(gateway, key).status_code == 200, "serving again", timeout=20)
    # The stream that outlived the outage is settled from its usage by the gateway itself:
    # its new writing connection adopted the reservation (nothing swept, nothing lost).
    row = until(
        lambda: ledgerdb.one(
            pg_url,
            "SELECT state, source FROM usage WHERE request_id = ? AND state <> 'open'",
            (rid,),
        ),
        "the held stream's settlement",
    )
    assert row == ("settled", "usage")
    # Its receipt and signature outcome, issued during the outage, were kept and written after.
    until(
        lambda: ledgerdb.one(
            pg_url,
            "SELECT 1 FROM usage u JOIN receipts r ON r.request_id = u.request_id "
            "WHERE u.request_id = ? AND u.signature = 'verified'",
            (rid,),
        ),
        "the held stream's receipt and signature outcome",
    )
    code, out, err = teegate("ledger", "verify", "--db", pg_url)
    assert code == 0, out + err
    log = gateway.log_text()
    assert "ledger.worker_relocked" in log and key not in log
