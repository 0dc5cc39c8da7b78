"""Several gateway processes on one PostgreSQL ledger: the guarantees hold across them.

Two real gateways (separate processes and ports, as on two machines) share one
database of the session's test cluster and one sandbox upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support import ledgerdb
from tests.support.accounts import create_account, create_key, teegate
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE
from tests.support.wait import until

MSG = [{"role": "user", "content": "Say hello"}]
BODY = {"model": TEE, "messages": MSG, "stream": True, "max_tokens": 64}


@pytest.fixture(scope="module")
def pg_url(pg_cluster) -> str:
    return pg_cluster.new_database("workers")


def _gateway(upstream: SandboxProc, url: str) -> GatewayProc:
    toml = f'ledger.url = "{url}"\nledger.sweep_interval_s = 0.2\n'
    return start_gateway(upstream.base_url, extra_toml=toml, balance_usd=None)


@pytest.fixture(scope="module")
def pair(upstream: SandboxProc, pg_url: str) -> Iterator[tuple[GatewayProc, GatewayProc]]:
    """Two gateways, started side by side (the last test kills the second)."""
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(_gateway, upstream, pg_url) for _ in range(2)]
        started = [f.result() for f in starting]  # a failed start raises here...
    with started[0] as a, started[1] as b:  # ...and a started one is stopped
        yield a, b


def _reserved_per_request(gw: GatewayProc, url: str) -> int:
    """What one BODY reserves (the same body reserves the same amount), from a probe request."""
    create_account(url, "probe", "100")  # type: ignore[arg-type]
    key = create_key(url, "probe")  # type: ignore[arg-type]
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{gw.api_base}/chat/completions", json=BODY, headers=_auth(key))
        assert r.status_code == 200, r.text
        rid = r.headers["x-request-id"]
    row = ledgerdb.one(url, "SELECT reserved_micro FROM usage WHERE request_id = ?", (rid,))
    assert row is not None
    return int(row[0])


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def _streams(
    gws: tuple[GatewayProc, ...], key: str, n: int, upstream: SandboxProc
) -> list[tuple[int, int]]:
    """``n`` concurrent streams across ``gws``: (gateway index, status) once all have answered."""
    statuses: list[tuple[int, int]] = []
    go = asyncio.Event()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        gw = gws[i % len(gws)]
        url = f"{gw.api_base}/chat/completions"
        async with client.stream("POST", url, json=BODY, headers=_auth(key)) as r:
            statuses.append((i % len(gws), r.status_code))
            await go.wait()
            await r.aread()

    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(n)]
        deadline = time.monotonic() + 60  # generous: a loaded 2-core machine
        while len(statuses) < n:  # the served ones are held mid-stream by the sandbox
            assert time.monotonic() < deadline, f"only {len(statuses)} of {n} answered"
            await asyncio.sleep(0.02)
        upstream.release()
        go.set()
        await asyncio.gather(*tasks)
    return statuses


def test_fifty_streams_across_two_workers_against_a_balance_for_ten(
    pair: tuple[GatewayProc, GatewayProc], upstream: SandboxProc, pg_url: str
) -> None:
    upstream.reset()
    each = _reserved_per_request(pair[0], pg_url)
    usd = f"{10 * each / 1_000_000:.6f}"
    create_account(pg_url, "ten", usd)  # type: ignore[arg-type]
    key = create_key(pg_url, "ten")  # type: ignore[arg-type]
    upstream.behaviour(hold_after_chunks=1)
    try:
        answers = asyncio.run(_streams(pair, key, 50, upstream))
    finally:
        upstream.behaviour(hold_after_chunks=None)
    statuses = [status for _, status in answers]
    assert statuses.count(200) == 10 and statuses.count(402) == 40, answers
    # Each process answered 25, so each refused at least 15 on the database's answer (a
    # PostgreSQL worker checks no balance in memory). How the 10 served split between the two
    # is a race: one worker's first group commit may hold all ten (seen in 2 of 3 runs on a
    # loaded machine), so it is not asserted.
    for gw in (0, 1):
        assert [s for g, s in answers if g == gw].count(402) >= 15, answers
    served = ledgerdb.one(
        pg_url,
        "SELECT COUNT(*) FROM usage u JOIN accounts a ON a.id = u.account_id WHERE a.name = 'ten'",
    )
    assert served == (10,)
    code, out, err = teegate("ledger", "verify", "--db", pg_url)
    assert code == 0, out + err


def test_a_rate_limit_is_shared_by_both_workers(
    pair: tuple[GatewayProc, GatewayProc], upstream: SandboxProc, pg_url: str
) -> None:
    upstream.reset()
    create_account(pg_url, "limited", "100")  # type: ignore[arg-type]
    key = create_key(pg_url, "limited", rate_limit=20)  # type: ignore[arg-type]
    body = {**BODY, "stream": False, "max_tokens": 8}
    statuses = []
    with httpx.Client(timeout=30) as c:
        for i in range(30):
            r = c.post(f"{pair[i % 2].api_base}/chat/completions", json=body, headers=_auth(key))
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                assert r.headers["x-ratelimit-remaining"] == "0"
        # Not a chat completion: counted too, with one statement, and refused likewise.
        r = c.get(f"{pair[0].api_base}/models", headers=_auth(key))
        assert r.status_code == 429
    assert statuses.count(200) == 20 and statuses.count(429) == 10, statuses


def test_a_chat_request_refused_before_billing_still_counts(
    pair: tuple[GatewayProc, GatewayProc], pg_url: str
) -> None:
    create_account(pg_url, "sloppy", "100")  # type: ignore[arg-type]
    key = create_key(pg_url, "sloppy", rate_limit=2)  # type: ignore[arg-type]
    body = {**BODY, "stream": False, "max_tokens": 8}
    with httpx.Client(timeout=30) as c:
        bad = c.post(
            f"{pair[0].api_base}/chat/completions", json={"model": TEE}, headers=_auth(key)
        )
        assert bad.status_code == 400  # no messages: refused before any reservation
        ok = c.post(f"{pair[1].api_base}/chat/completions", json=body, headers=_auth(key))
        assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining"] == "0"
        over = c.post(f"{pair[0].api_base}/chat/completions", json=body, headers=_auth(key))
        assert over.status_code == 429


def test_the_admin_api_of_either_worker_serves_the_one_ledger(
    pair: tuple[GatewayProc, GatewayProc], pg_url: str
) -> None:
    """An admin token made once works on both; a top-up retried on the other worker credits
    once (the idempotency key is unique in the database); both report the ledger writable."""
    code, out, err = teegate("admin", "token", "create", "--label", "ops", "--db", pg_url)
    assert code == 0, err
    token = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("admin token:"))
    create_account(pg_url, "admin-api", "1")  # type: ignore[arg-type]
    path = "/admin/v1/accounts/admin-api/topups"
    auth = {"authorization": f"Bearer {token}", "idempotency-key": "wire-42"}
    answers = []
    for gw in pair:
        with httpx.Client(base_url=gw.urls["admin"], timeout=30) as c:
            answers.append(c.post(path, json={"amount_usd": "2.00"}, headers=auth))
            ready = c.get("/readyz").json()
            assert ready["checks"]["ledger"]["ok"] is True, ready
    # Seen once (1 run in 6, whole folder): a 500 on the second worker; the logs say why.
    why = [a.text for a in answers] + [gw.log_text()[-4000:] for gw in pair]
    assert [a.status_code for a in answers] == [201, 200], why
    assert [a.json()["replayed"] for a in answers] == [False, True]
    assert answers[0].json()["entry_id"] == answers[1].json()["entry_id"]
    (balance,) = ledgerdb.one(
        pg_url, "SELECT balance_micro FROM accounts WHERE name = ?", ("admin-api",)
    ) or (None,)
    assert balance == 3_000_000


def test_a_receipt_and_its_signature_outcome_reach_the_shared_ledger(
    pair: tuple[GatewayProc, GatewayProc], pg_url: str
) -> None:
    """Served by one worker, the checked receipt is read through the other (only by its key),
    and the usage row in PostgreSQL records the verified signature."""
    create_account(pg_url, "receipts", "100")  # type: ignore[arg-type]
    key = create_key(pg_url, "receipts")  # type: ignore[arg-type]
    create_account(pg_url, "receipts-stranger", "1")  # type: ignore[arg-type]
    stranger = create_key(pg_url, "receipts-stranger")  # type: ignore[arg-type]
    body = {**BODY, "stream": False, "max_tokens": 8}
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{pair[0].api_base}/chat/completions", json=body, headers=_auth(key))
        assert r.status_code == 200, r.text
        rid, receipt_id = r.headers["x-request-id"], r.headers["x-teegate-receipt"]
        url = f"{pair[1].api_base}/receipts/{receipt_id}"

        def checked() -> dict | None:
            got = c.get(url, headers=_auth(key))
            if got.status_code != 200:
                return None
            doc = got.json()["receipt"]
            return doc if doc["upstream_signature"]["status"] != "pending" else None

        doc = until(checked, "the checked receipt on the other worker")
        assert doc["upstream_signature"]["status"] == "verified" and doc["revision"] == 2
        assert c.get(url, headers=_auth(stranger)).status_code == 404
    signature = until(
        lambda: ledgerdb.one(
            pg_url, "SELECT signature FROM usage WHERE request_id = ? AND signature <> 'pending'",
            (rid,),
        ),
        "the usage row's signature outcome",
    )
    assert signature == ("verified",)


def test_a_worker_killed_mid_stream_is_charged_by_the_other(
    pair: tuple[GatewayProc, GatewayProc], upstream: SandboxProc, pg_url: str
) -> None:
    upstream.reset()
    survivor, victim = pair  # the module's last test: the victim stays dead
    create_account(pg_url, "crash", "100")  # type: ignore[arg-type]
    key = create_key(pg_url, "crash")  # type: ignore[arg-type]
    upstream.behaviour(hold_after_chunks=1)
    try:
        with httpx.Client(timeout=30) as c:
            with c.stream(
                "POST", f"{victim.api_base}/chat/completions", json=BODY, headers=_auth(key)
            ) as r:
                assert r.status_code == 200
                rid = r.headers["x-request-id"]
                next(r.iter_bytes())  # mid-answer
                victim.kill()
    finally:
        upstream.release()
        upstream.behaviour(hold_after_chunks=None)
    deadline = time.monotonic() + 15
    while True:  # the survivor's sweeper (every 0.2 s here) charges it, nobody restarts
        row = ledgerdb.one(
            pg_url,
            "SELECT state, source, charge_micro, reserved_micro FROM usage WHERE request_id = ?",
            (rid,),
        )
        if row is not None and row[0] != "open":
            break
        assert time.monotonic() < deadline, f"never swept: {row}"
        time.sleep(0.05)
    assert row[:2] == ("settled", "recovered") and row[2] == row[3]
    with httpx.Client(timeout=30) as c:  # the other worker kept serving throughout
        body = {**BODY, "stream": False}
        r = c.post(f"{survivor.api_base}/chat/completions", json=body, headers=_auth(key))
        assert r.status_code == 200
    code, out, err = teegate("ledger", "verify", "--db", pg_url)
    assert code == 0, out + err
