"""What only the PostgreSQL store promises: many workers on one database.

Each worker is a :class:`PgLedger` with its own connections (in this process,
or a child process killed with SIGKILL); the database is real.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from teegate.ledger import (
    InsufficientBalance,
    Ledger,
    LedgerLocked,
    LedgerUnavailable,
    RateLimited,
    Reservation,
    Store,
)
from teegate.ledger.pgschema import LOCK_SPACE
from teegate.ledger.pgstore import CONNECT_DEFAULTS, connect_params, server_settings
from teegate.ledger.receipts import StoredReceipt
from tests.support import ledgerdb as db
from tests.support.ledger import PRICES, fund
from tests.support.wait import until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def url(pg_cluster, pg_module_db: str) -> str:
    return pg_cluster.reset(pg_module_db)


async def test_two_workers_never_overspend(url: str) -> None:
    """Concurrent reservations from two workers against a balance for exactly 10."""
    a = await Ledger.open(url)
    b = await Ledger.open(url)
    try:
        assert a.worker_id != b.worker_id
        f = await fund(a, "alice", 10_000)
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).reserve(f"r{i}", f.key, "m", PRICES, 1000)
                for i in range(50)
            ),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, Reservation)]
        lost = [r for r in results if isinstance(r, InsufficientBalance)]
        assert (len(won), len(lost)) == (10, 40)
        assert db.one(url, "SELECT balance_micro FROM accounts WHERE id = ?", (f.account_id,)) == (
            0,
        )
        report = await a.verify()
        assert report.ok and len(report.open_reservations) == 10
    finally:
        await a.close()
        await b.close()


async def test_a_shared_rate_limit_admits_exactly_the_limit_across_workers(url: str) -> None:
    a = await Ledger.open(url)
    b = await Ledger.open(url)
    try:
        f = await fund(a, "alice", 10**9)
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).reserve(f"r{i}", f.key, "m", PRICES, 1, rate_limit=20)
                for i in range(30)
            ),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, Reservation)]
        limited = [r for r in results if isinstance(r, RateLimited)]
        assert (len(won), len(limited)) == (20, 10)
        assert sorted(r.rate_window[0] for r in won) == list(range(1, 21))  # type: ignore[index]
        assert all(e.limit == 20 and e.count > 20 for e in limited)
    finally:
        await a.close()
        await b.close()


async def test_the_rate_limit_comes_before_the_balance_check(url: str) -> None:
    led = await Ledger.open(url)
    try:
        f = await fund(led, "alice", 1000)
        await led.reserve("a", f.key, "m", PRICES, 1000, rate_limit=1)
        with pytest.raises(RateLimited):  # 429, not 402, although the balance is gone too
            await led.reserve("b", f.key, "m", PRICES, 1000, rate_limit=1)
    finally:
        await led.close()


async def test_a_revocation_reaches_another_worker_within_a_second(url: str) -> None:
    a = await Ledger.open(url)
    b = await Ledger.open(url)
    try:
        f = await fund(a, "alice", 1000)
        assert await b.authenticate(f.plaintext) == f.key  # cached in b
        started = time.monotonic()
        assert await a.revoke_key(f.key.key_id)

        async def gone() -> bool:
            return await b.authenticate(f.plaintext) is None

        while not await gone():
            assert time.monotonic() - started < 1.0, "b still accepts a revoked key after 1 s"
            await asyncio.sleep(0.01)
    finally:
        await a.close()
        await b.close()


async def test_a_rate_limit_changed_elsewhere_reaches_the_worker_within_a_second(url: str) -> None:
    led = await Ledger.open(url)
    try:
        f = await fund(led, "alice", 1000)
        assert (await led.authenticate(f.plaintext)).rate_limit is None  # type: ignore[union-attr]
        started = time.monotonic()
        db.execute(url, "UPDATE api_keys SET rate_limit = 60 WHERE id = ?", (f.key.key_id,))
        while (await led.authenticate(f.plaintext)).rate_limit != 60:  # type: ignore[union-attr]
            assert time.monotonic() - started < 1.0, "the cached key kept its old limit"
            await asyncio.sleep(0.01)
    finally:
        await led.close()


async def test_a_topup_elsewhere_is_spendable_at_once(url: str) -> None:
    led = await Ledger.open(url)
    try:
        f = await fund(led, "alice", 1000)
        async with await Store.open(url, create=False) as store:
            await store.credit(f.account_id, 5000, "topup", None)
        assert (await led.reserve("a", f.key, "m", PRICES, 6000)).amount_micro == 6000
    finally:
        await led.close()


async def test_an_explicit_worker_id_is_held_for_the_workers_life(url: str) -> None:
    led = await Ledger.open(url, worker_id=7)
    try:
        assert led.worker_id == 7
        with pytest.raises(LedgerLocked):
            await Ledger.open(url, worker_id=7)
    finally:
        await led.close()
    await (await Ledger.open(url, worker_id=7)).close()  # free again


async def test_a_restarted_worker_charges_what_its_previous_life_left_open(url: str) -> None:
    led = await Ledger.open(url, worker_id=3)
    f = await fund(led, "alice", 10_000)
    res = await led.reserve("a", f.key, "m", PRICES, 4000)
    await led.close()  # as a crash would: the reservation stays open
    led = await Ledger.open(url, worker_id=3, recover=False)
    try:
        assert [r.reservation_id for r in led.recovered] == [res.id]
        assert (await led.verify()).open_reservations == []
    finally:
        await led.close()


async def test_a_reservation_that_cannot_be_committed_fails_closed(url: str) -> None:
    led = await Ledger.open(url)
    try:
        f = await fund(led, "alice", 10_000)
        db.execute(
            url,
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$",
        )
        db.execute(url, "CREATE TRIGGER boom BEFORE INSERT ON entries EXECUTE FUNCTION boom()")
        with pytest.raises(LedgerUnavailable):
            await led.reserve("a", f.key, "m", PRICES, 4000)
        db.execute(url, "DROP TRIGGER boom ON entries")
        res = await led.reserve("b", f.key, "m", PRICES, 4000)
        assert res.amount_micro == 4000
        # The failed one left nothing behind: the balance is whole but for "b".
        assert db.one(url, "SELECT balance_micro FROM accounts") == (6000,)
    finally:
        await led.close()


def _held_worker_locks(url: str) -> set[int]:
    return {
        int(r[0])
        for r in db.rows(
            url, "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = ?",
            (LOCK_SPACE,),
        )
    }


async def _terminate_writer(url: str, led: Ledger) -> None:
    """End the worker's writing session (as a server restart would), and wait until its lock
    is gone: from then on the session can run nothing more."""
    pid = led._writer_conn.info.backend_pid  # type: ignore[union-attr]
    db.execute(url, "SELECT pg_terminate_backend(?)", (pid,))
    until(lambda: led.worker_id not in _held_worker_locks(url), "the lost lock")


async def test_a_lost_writer_connection_is_replaced_under_a_new_worker_id(url: str) -> None:
    """The lock went with the connection, so the id may be swept at any time: never take it
    again. The new id adopts what the worker still knows open, which then settles exactly."""
    led = await Ledger.open(url)
    try:
        f = await fund(led, "alice", 10_000)
        before = await led.reserve("before", f.key, "m", PRICES, 1000)
        old = led.worker_id
        await _terminate_writer(url, led)
        await led.check_writer()  # what the key poll does every key_poll_ms
        assert led.worker_id != old
        assert _held_worker_locks(url) == {led.worker_id}  # the old id is free for good
        assert db.one(url, "SELECT worker_id FROM usage WHERE reservation_id = ?",
                      (before.id,)) == (led.worker_id,)  # fmt: skip
        res = await led.reserve("after", f.key, "m", PRICES, 100)
        await led.settle(before, 10, 10, 0, "usage")
        await led.settle(res, 10, 10, 0, "usage")
        await led.flush()
        with pytest.raises(LedgerLocked):  # the new connection holds the new id's lock
            await Ledger.open(url, worker_id=led.worker_id)
        assert db.one(url, "SELECT balance_micro FROM accounts") == (10_000 - 2 * 30,)
        assert (await led.verify()).ok
    finally:
        await led.close()


async def test_a_reservation_committed_but_reported_failed_is_released_after_reconnecting(
    url: str,
) -> None:
    """The connection died with the commit's answer: the caller was refused (nothing sent),
    yet the hold may exist. Once reconnected, the worker finds it by request id and releases
    it, rather than leaving it under the old id for a sweeper to charge in full."""
    led = await Ledger.open(url)
    try:
        f = await fund(led, "alice", 10_000)
        lost = await led.reserve("lost-answer", f.key, "m", PRICES, 4000)
        del led._open[lost.id]  # as if the commit's answer had been lost on the way...
        led._doubt({"request_id": "lost-answer", "price_input": PRICES.input,  # ...and the
                    "price_output": PRICES.output, "price_cache_read": PRICES.cache_read,
                    "created_ms": lost.created_ms})  # committer had reported it  # fmt: skip
        await _terminate_writer(url, led)
        await led.check_writer()
        await led.flush()
        assert db.one(url, "SELECT state, status FROM usage WHERE reservation_id = ?",
                      (lost.id,)) == ("released", "commit in doubt; not sent")  # fmt: skip
        assert db.one(url, "SELECT balance_micro FROM accounts") == (10_000,)
        assert (await led.verify()).ok
    finally:
        await led.close()


async def test_a_worker_swept_after_losing_its_lock_is_charged_once(url: str) -> None:
    """Another worker's sweeper got there first: its full charge stands, the late settlement
    and release are dropped as duplicates (not added), and the worker reserves again only
    under a new id, which no sweeper takes while it lives."""
    a = await Ledger.open(url)
    b = await Ledger.open(url)
    try:
        f = await fund(a, "alice", 10_000)
        r1 = await a.reserve("r1", f.key, "m", PRICES, 4000)
        r2 = await a.reserve("r2", f.key, "m", PRICES, 3000)
        old = a.worker_id
        await _terminate_writer(url, a)
        swept = await b.sweep()
        assert sorted(r.reservation_id for r in swept) == [r1.id, r2.id]
        await a.settle(r1, 10, 10, 0, "usage")  # fails on the dead connection, then retried
        await a.release(r2, "client went away")
        with pytest.raises(LedgerUnavailable):  # the batch met the dead connection...
            await a.flush()
        await a.flush()  # ...and was retried on a new one
        assert a.worker_id != old
        rows = db.rows(url, "SELECT reservation_id, state, source, charge_micro FROM usage "
                            "ORDER BY reservation_id")  # fmt: skip
        assert rows == [(r1.id, "settled", "recovered", 4000),
                        (r2.id, "settled", "recovered", 3000)]  # fmt: skip
        assert db.one(url, "SELECT COUNT(*) FROM entries WHERE reservation_id IS NOT NULL") == (2,)
        r3 = await a.reserve("r3", f.key, "m", PRICES, 1000)
        assert await b.sweep() == []  # a lives, under its new id
        await a.settle(r3, 10, 10, 0, "usage")
        await a.flush()
        assert db.one(url, "SELECT balance_micro FROM accounts") == (10_000 - 7000 - 30,)
        report = await b.verify()
        assert report.ok and report.open_reservations == []
    finally:
        await a.close()
        await b.close()


async def test_a_lost_reading_connection_is_replaced_at_once(url: str) -> None:
    led = await Ledger.open(url)
    try:
        f = await fund(led, "alice", 10_000)
        pid = led._admin.db.info.backend_pid  # type: ignore[attr-defined]
        db.execute(url, "SELECT pg_terminate_backend(?)", (pid,))
        assert await led.authenticate(f.plaintext) == f.key  # not cached: read from the database
    finally:
        await led.close()


CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from teegate.ledger import Ledger, Prices

    async def main():
        led = await Ledger.open(sys.argv[1])
        key = await led.authenticate(os.environ["TEST_LEDGER_KEY"])
        held = [await led.reserve(f"w-{i}", key, "m", Prices(1, 1), 700) for i in range(3)]
        print("READY", " ".join(str(r.id) for r in held), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_the_sweeper_charges_a_killed_workers_reservations_while_others_serve(
    url: str,
) -> None:
    survivor = await Ledger.open(url, sweep_interval_s=0.1)
    try:
        f = await fund(survivor, "alice", 10_000)
        env = {**os.environ, "TEST_LEDGER_KEY": f.plaintext, "PYTHONPATH": str(REPO)}
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, url,
            stdout=asyncio.subprocess.PIPE, env=env, cwd=REPO,
        )  # fmt: skip
        try:
            assert child.stdout is not None
            line = (await asyncio.wait_for(child.stdout.readline(), 30)).decode()
            assert line.startswith("READY"), line
            open_ids = sorted(int(x) for x in line.split()[1:])
            mine = await survivor.reserve("mine", f.key, "m", PRICES, 1000)
            assert await survivor.sweep() == []  # its worker is alive: nothing taken
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()
        deadline = time.monotonic() + 10
        while len(survivor.recovered) < 3:  # the periodic sweeper, not a call of ours
            assert time.monotonic() < deadline, "the sweeper never charged the dead worker's"
            await asyncio.sleep(0.02)
        assert sorted(r.reservation_id for r in survivor.recovered) == open_ids
        assert all(r.charged_micro == 700 for r in survivor.recovered)
        await survivor.settle(mine, 10, 10, 0, "usage")  # its own stayed its own
        await survivor.flush()
        report = await survivor.verify()
        assert report.ok and report.open_reservations == []
        assert db.one(url, "SELECT balance_micro FROM accounts") == (10_000 - 3 * 700 - 30,)
    finally:
        await survivor.close()


async def test_a_settlement_after_the_sweeper_is_a_harmless_duplicate(url: str) -> None:
    a = await Ledger.open(url)
    f = await fund(a, "alice", 10_000)
    res = await a.reserve("a", f.key, "m", PRICES, 4000)
    # Another worker's sweeper charged it (as if a's lock had been lost meanwhile).
    db.execute(
        url,
        "INSERT INTO entries (account_id, kind, amount_micro, reservation_id, created_ms, note) "
        "VALUES (?, 'settlement', 0, ?, 0, 'recovered')",
        (f.account_id, res.id),
    )
    db.execute(
        url,
        "UPDATE usage SET state = 'settled', charge_micro = reserved_micro, "
        "source = 'recovered', status = 'recovered' WHERE reservation_id = ?",
        (res.id,),
    )
    await a.settle(res, 10, 10, 0, "usage")
    await a.flush()
    try:
        assert db.rows(url, "SELECT kind FROM entries WHERE reservation_id = ?", (res.id,)) == [
            ("settlement",)
        ]
        assert (await a.verify()).ok
    finally:
        await a.close()


async def test_racing_topups_with_one_idempotency_key_credit_once(url: str) -> None:
    """Two admin connections (two workers' admin APIs) retry one top-up at the same moment:
    the unique index admits one entry; the other call finds it and reports it replayed."""
    async with await Store.open(url) as setup:
        acct = await setup.create_account("acme")
    stores = [await Store.open(url, create=False) for _ in range(4)]
    try:
        for attempt in range(5):  # each round a fresh key, all stores at once
            credits = await asyncio.gather(
                *(s.topup(acct.id, 1000, idempotency_key=f"k{attempt}") for s in stores)
            )
            assert sorted(c.replayed for c in credits) == [False, True, True, True]
            assert len({c.entry_id for c in credits}) == 1
        assert db.one(url, "SELECT balance_micro FROM accounts WHERE id = ?", (acct.id,)) == (
            5000,
        )
        assert (await stores[0].verify()).ok
    finally:
        for s in stores:
            await s.close()


async def test_admin_tokens_and_receipts_are_shared_by_every_worker(url: str) -> None:
    a = await Ledger.open(url)
    b = await Ledger.open(url)
    try:
        _, plaintext = await a.admin_tokens.create("ops")
        assert (await b.admin_tokens.authenticate(plaintext)) is not None
        f = await fund(a, "alice", 10_000)
        res = await a.reserve("req-1", f.key, "m", PRICES, 1000)
        doc = StoredReceipt("rcpt_1", f.key.key_id, "req-1", 1, 1, '{"v":1}')
        await a.write_receipts([doc], [(res.id, "pending")])
        assert await b.receipt("rcpt_1", f.key.key_id) == '{"v":1}'
        assert await a.writable() and await b.writable()
        await a.close()
        assert not await a.writable()
    finally:
        await a.close()
        await b.close()


async def test_a_version_1_database_gains_signatures_and_receipts(url: str) -> None:
    """The branch's first schema (before main's receipts) is migrated in place, rows kept."""
    import psycopg

    from teegate.ledger.pgschema import MIGRATIONS, SCHEMA_VERSION

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE teegate_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO teegate_schema VALUES (1)")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO accounts (name, created_ms) VALUES ('old', 1)")
    led = await Ledger.open(url)
    try:
        assert db.one(url, "SELECT version FROM teegate_schema") == (SCHEMA_VERSION,)
        key, _ = await led.create_key("old")
        doc = StoredReceipt("rcpt_old", key.key_id, "req", 1, 1, "{}")
        await led.write_receipts([doc], [])
        assert await led.receipt("rcpt_old", key.key_id) == "{}"
        assert db.rows(url, "SELECT name FROM accounts") == [("old",)]
    finally:
        await led.close()


def test_connections_bound_dead_peers_unless_the_url_says_otherwise() -> None:
    assert connect_params("postgresql://u@db.internal/teegate") == CONNECT_DEFAULTS
    url = "postgresql://u@db.internal/teegate?keepalives_idle=60&connect_timeout=2"
    assert connect_params(url) == {
        k: v for k, v in CONNECT_DEFAULTS.items() if k not in ("keepalives_idle", "connect_timeout")
    }
    assert server_settings(url) == {
        "tcp_keepalives_idle": "60",
        "tcp_keepalives_interval": CONNECT_DEFAULTS["keepalives_interval"],
        "tcp_keepalives_count": CONNECT_DEFAULTS["keepalives_count"],
        "tcp_user_timeout": CONNECT_DEFAULTS["tcp_user_timeout"],
    }
    assert server_settings("postgresql://u@db.internal/teegate?keepalives=0") == {}


async def test_every_ledger_connection_carries_the_keepalives_on_both_ends(url: str) -> None:
    """libpq's on the client's socket; the server's (tcp_keepalives_*, tcp_user_timeout) set
    for the session, which is what frees a vanished worker's lock. (On this Unix socket the
    server reads them as 0, but records that the session set them.)"""
    led = await Ledger.open(url)
    try:
        for conn in (led._writer_conn, led._admin.db):  # type: ignore[attr-defined]
            params = conn.info.get_parameters()
            assert {k: params.get(k) for k in CONNECT_DEFAULTS} == CONNECT_DEFAULTS
            cur = await conn.execute(
                "SELECT name, source FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
                (list(server_settings(url)),),
            )
            rows = await cur.fetchall()
            assert len(rows) == 4 and {source for _, source in rows} == {"session"}, rows
    finally:
        await led.close()
