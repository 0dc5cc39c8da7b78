"""A PostgreSQL server that goes silent (host gone, network partition): requests fail fast.

Between the ledger and the real test cluster sits a forwarder that can stop relaying bytes
while keeping every socket open (:class:`tests.support.silent_forwarder.SilentForwarder`):
no RST, no answer, as a partition looks from the client. Every request-path statement must
then fail closed (:class:`LedgerUnavailable`) within ``statement_timeout_ms`` instead of the
kernel's ~30 s, its connection replaced, and a reservation whose answer was lost must end
neither charged nor open once the network is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import psycopg.conninfo
import pytest

from teegate.ledger import Ledger, LedgerUnavailable
from tests.support import ledgerdb as db
from tests.support.ledger import PRICES, fund
from tests.support.postgres import Cluster
from tests.support.silent_forwarder import SilentForwarder

DEADLINE_MS = 400
MARGIN_S = 1.5  # scheduling on a loaded 2-core machine; far below the kernel's 30 s


@pytest.fixture
def url(pg_cluster: Cluster, pg_module_db: str) -> str:
    return pg_cluster.reset(pg_module_db)


@pytest.fixture
def forwarder(pg_cluster: Cluster) -> Iterator[SilentForwarder]:
    with SilentForwarder(pg_cluster.socket_dir / ".s.PGSQL.5432") as fwd:
        yield fwd


async def _fails_fast(call: Callable[[], Awaitable[object]]) -> float:
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable):
        await call()
    took = time.monotonic() - started
    assert took < DEADLINE_MS / 1000 + MARGIN_S, took
    return took


async def _until_ok[T](call: Callable[[], Awaitable[T]], within_s: float = 15.0) -> T:
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except LedgerUnavailable:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)  # the reconnect back-off: polled, not raced


@pytest.mark.parametrize("lost", ["both ways", "answers only"])
async def test_a_silent_server_fails_requests_within_the_deadline_then_serves_again(
    url: str, forwarder: SilentForwarder, lost: str
) -> None:
    """``both ways``: nothing reaches the server (the held bytes arrive when it heals).
    ``answers only``: the reservation commits but its answer never comes: in doubt, and
    released once the worker is back (its request was refused), never charged or left open."""
    database = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    led = await Ledger.open(forwarder.url(database), statement_timeout_ms=DEADLINE_MS)
    try:
        f = await fund(led, "alice", 10_000)
        _, other = await led.create_key(f.account_id, label="never looked up")
        before = await led.reserve("before", f.key, "m", PRICES, 1000)
        await led.settle(before, 10, 10, 0, "usage")
        await led.flush()
        forwarder.silence(up=lost == "both ways")
        await _fails_fast(lambda: led.reserve("silent", f.key, "m", PRICES, 4000))
        await _fails_fast(lambda: led.authenticate(other))  # a key lookup on the other one
        await _fails_fast(lambda: led.count_request(f.key))
        forwarder.resume()
        after = await _until_ok(lambda: led.reserve("after", f.key, "m", PRICES, 1000))
        await led.settle(after, 10, 10, 0, "usage")
        await led.flush()
        assert await led.authenticate(other) is not None
        state = await _until_ok(lambda: _settled(url, "silent"))
        assert state in ((), ("released",)), state  # never committed, or released
        assert db.one(url, "SELECT balance_micro FROM accounts") == (10_000 - 2 * 30,)
        assert db.one(url, "SELECT count(*) FROM usage WHERE state = 'open'") == (0,)
        assert (await led.verify()).ok
    finally:
        forwarder.resume()
        await led.close()


async def _settled(url: str, request_id: str) -> tuple[str, ...]:
    """The reservation's final state (``()``: none was committed); waits out an open one."""
    row = db.one(url, "SELECT state FROM usage WHERE request_id = ?", (request_id,))
    if row == ("open",):
        raise LedgerUnavailable("still open")
    return tuple(row or ())


async def test_a_reservation_held_in_a_partition_cannot_commit_after_the_worker_came_back(
    url: str, forwarder: SilentForwarder
) -> None:
    """The new connection comes up while the old one is still partitioned, its reservation
    held on the way: the worker ends the old server session before it settles what was in
    doubt, so the held statement can never commit later (under the old id, for a sweeper
    to charge in full for a refused request)."""
    database = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    led = await Ledger.open(
        forwarder.url(database), statement_timeout_ms=DEADLINE_MS, sweep_interval_s=0.2
    )
    try:
        f = await fund(led, "alice", 10_000)
        forwarder.silence()
        await _fails_fast(lambda: led.reserve("held", f.key, "m", PRICES, 4000))
        forwarder.heal_new_connections()
        after = await _until_ok(lambda: led.reserve("after", f.key, "m", PRICES, 1000))
        forwarder.resume()  # the held reservation arrives now, too late to commit
        await led.settle(after, 10, 10, 0, "usage")
        await led.flush()
        await led.sweep()
        assert db.one(url, "SELECT state FROM usage WHERE request_id = 'held'") is None
        assert db.one(url, "SELECT balance_micro FROM accounts") == (10_000 - 30,)
        assert (await led.verify()).ok
    finally:
        forwarder.resume()
        await led.close()


async def test_request_path_connections_carry_the_deadline_on_the_server_side(url: str) -> None:
    """The writing connection's statements are all short: the server cancels one past the
    deadline; both connections end a session left idle inside a transaction."""
    led = await Ledger.open(url, statement_timeout_ms=1234)
    try:
        writer = led._writer_conn  # type: ignore[attr-defined]
        reader = led._admin.db  # type: ignore[attr-defined]
        names = "current_setting('statement_timeout'), " \
            "current_setting('idle_in_transaction_session_timeout')"  # fmt: skip
        assert await (await writer.execute(f"SELECT {names}")).fetchone() == ("1234ms", "1234ms")
        assert await (await reader.execute(f"SELECT {names}")).fetchone() == ("0", "1234ms")
    finally:
        await led.close()
