"""``teegate run --workers 2`` on a PostgreSQL ledger: one /metrics adds up both workers.

Which worker served a chat request is in the database (``usage.worker_id``: each worker
reserves under its own id), so the test sends requests on fresh connections until both have
served some, then reads worker 1's /metrics: the chat counter is the sum over both processes
(prometheus_client's multiprocess files under the supervisor's PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from teegate.addons.routes import CHAT_PATH
from tests.support import ledgerdb
from tests.support.accounts import create_account, create_key
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE
from tests.support.wait import until

BODY = {"model": TEE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def pg_url(pg_cluster) -> str:
    return pg_cluster.new_database("supervised")


@pytest.fixture(scope="module")
def two_workers(upstream: SandboxProc, pg_url: str) -> Iterator[GatewayProc]:
    toml = f'ledger.url = "{pg_url}"\n'
    with start_gateway(
        upstream.base_url, args=("--workers", "2"), extra_toml=toml, balance_usd=None,
        start_timeout=60,
    ) as gw:  # fmt: skip
        yield gw


def _chats_served(metrics_text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name == "teegate_requests"
        for s in family.samples
        if s.name == "teegate_requests_total"
        and s.labels.get("route") == CHAT_PATH
        and s.labels.get("status") == "200"
    )


def test_metrics_add_up_the_requests_of_both_workers(
    two_workers: GatewayProc, pg_url: str
) -> None:
    create_account(pg_url, "alice", "100")  # type: ignore[arg-type]
    key = create_key(pg_url, "alice")  # type: ignore[arg-type]
    headers = {"authorization": f"Bearer {key}", "connection": "close"}  # a new connection
    sent = 0

    def workers_seen() -> set[int]:
        rows = ledgerdb.rows(pg_url, "SELECT DISTINCT worker_id FROM usage")
        return {int(r[0]) for r in rows}

    while len(workers_seen()) < 2:  # the kernel spreads new connections over both listeners
        assert sent < 60, f"{sent} requests all reached one worker"
        r = httpx.post(
            f"{two_workers.api_base}/chat/completions", json=BODY, headers=headers, timeout=30
        )
        assert r.status_code == 200, r.text
        sent += 1
    per_worker = ledgerdb.rows(pg_url, "SELECT worker_id, COUNT(*) FROM usage GROUP BY 1")
    assert sum(int(n) for _, n in per_worker) == sent
    with httpx.Client(base_url=two_workers.urls["admin"], timeout=30) as admin:
        until(
            lambda: _chats_served(admin.get("/metrics").text) == sent,
            f"/metrics counting all {sent} chats of both workers {per_worker}",
        )


def test_each_worker_listened_only_once_warm(two_workers: GatewayProc) -> None:
    """Every worker (worker 1 too) accepted connections only after its catalog and first
    verdicts: a `warmed_up` line each, before the supervisor's READY (tests/workers/
    test_listeners.py shows a held socket takes no connection)."""
    out = two_workers.output_text()
    warmed = [line for line in out.splitlines() if '"warmed_up"' in line]
    assert len(warmed) >= 2, out[-3000:]
    assert out.index('"warmed_up"') < out.index("TEEGATE READY")
