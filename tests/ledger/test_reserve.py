"""Reservations, settlements and releases on the request path."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from teegate.ledger import (
    InsufficientBalance,
    Ledger,
    LedgerError,
    LedgerLocked,
    LedgerUnavailable,
    Reservation,
    Store,
    Timing,
    UnknownAccount,
)
from teegate.ledger.models import ApiKey
from tests.support import ledgerdb as db
from tests.support.ledger import PRICES, fund


def _db_balance(db_path: str, account_id: int) -> tuple[int, int]:
    """(cached balance, sum of entries) straight from the database."""
    (cached,) = db.one(db_path, "SELECT balance_micro FROM accounts WHERE id = ?", (account_id,))
    (derived,) = db.one(
        db_path,
        "SELECT COALESCE(SUM(amount_micro), 0) FROM entries WHERE account_id = ?",
        (account_id,),
    )
    return int(cached), int(derived)


def _finals(db_path: str, reservation_id: int) -> list[tuple[str, int]]:
    sql = "SELECT kind, amount_micro FROM entries WHERE reservation_id = ?"
    return db.rows(db_path, sql, (reservation_id,))


@pytest.mark.parametrize("batch_ms", [0.0, 2.0])
async def test_fifty_concurrent_reservations_against_a_balance_for_ten(
    db_path: str, batch_ms: float
) -> None:
    led = await Ledger.open(db_path, batch_ms=batch_ms)
    try:
        f = await fund(led, "alice", 10_000)
        results = await asyncio.gather(
            *(led.reserve(f"req-{i}", f.key, "m", PRICES, 1000) for i in range(50)),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, Reservation)]
        lost = [r for r in results if isinstance(r, InsufficientBalance)]
        assert len(won) == 10 and len(lost) == 40
        assert all(0 <= e.balance_micro < e.needed_micro == 1000 for e in lost)
        assert len({r.id for r in won}) == 10
        assert led.available_micro(f.account_id) == 0
        await led.flush()
        assert _db_balance(db_path, f.account_id) == (0, 0)
        # Everything comes back when they are released; the balance never went negative.
        for r in won:
            await led.release(r, "test")
        await led.flush()
        assert led.available_micro(f.account_id) == 10_000
        assert _db_balance(db_path, f.account_id) == (10_000, 10_000)
        assert (await led.verify()).ok
    finally:
        await led.close()


async def test_concurrent_reservations_share_commits(db_path: str) -> None:
    led = await Ledger.open(db_path, batch_ms=0)
    try:
        f = await fund(led, "alice", 10**9)
        before = led._writer.commits
        reservations = await asyncio.gather(
            *(led.reserve(f"r{i}", f.key, "m", PRICES, 10) for i in range(64))
        )
        assert len(reservations) == 64
        assert led._writer.commits - before < 64 / 4  # group commit, not one per request
    finally:
        await led.close()


async def test_settle_charges_actual_usage_and_returns_the_rest_after_commit(
    ledger: Ledger, db_path: str
) -> None:
    f = await fund(ledger, "alice", 100_000)
    res = await ledger.reserve("req-1", f.key, "model-x", PRICES, 50_000)
    assert ledger.available_micro(f.account_id) == 50_000
    timing = Timing(
        start_ms=1_700_000_000_000, first_byte_ms=1_700_000_000_120, end_ms=1_700_000_001_000
    )
    charge = await ledger.settle(res, 3000, 1000, 1000, "usage", timing)
    # 2000 uncached * $1/M + 1000 cached * $0.5/M + 1000 out * $2/M = 2000 + 500 + 2000
    assert charge == 4500
    # The unused part of the hold is not spendable until the settlement is committed.
    assert ledger.available_micro(f.account_id) == 50_000
    await ledger.flush()
    assert ledger.available_micro(f.account_id) == 100_000 - 4500
    assert _db_balance(db_path, f.account_id) == (95_500, 95_500)
    row = db.one(
        db_path,
        "SELECT request_id, key_id, model, prompt_tokens, completion_tokens, cached_tokens, "
        "charge_micro, reserved_micro, source, status, start_ms, first_byte_ms, end_ms, state "
        "FROM usage WHERE reservation_id = ?",
        (res.id,),
    )
    assert row == (
        "req-1",
        f.key.key_id,
        "model-x",
        3000,
        1000,
        1000,
        4500,
        50_000,
        "usage",
        "ok",
        timing.start_ms,
        timing.first_byte_ms,
        timing.end_ms,
        "settled",
    )


async def test_settle_and_release_are_idempotent(ledger: Ledger, db_path: str) -> None:
    f = await fund(ledger, "alice", 100_000)
    a = await ledger.reserve("a", f.key, "m", PRICES, 10_000)
    b = await ledger.reserve("b", f.key, "m", PRICES, 10_000)
    first = await ledger.settle(a, 1000, 1000, 0, "usage")
    # A second settle (say, from an error hook) and a release change nothing.
    assert await ledger.settle(a, 9999, 9999, 0, "usage") == first
    await ledger.release(a, "error hook")
    await ledger.release(b, "client went away")
    await ledger.release(b, "again")
    assert await ledger.settle(b, 1000, 1000, 0, "usage") == 0
    await ledger.flush()
    assert _finals(db_path, a.id) == [("settlement", 10_000 - first)]
    assert _finals(db_path, b.id) == [("release", 10_000)]
    assert ledger.available_micro(f.account_id) == 100_000 - first
    report = await ledger.verify()
    assert report.ok and not report.open_reservations


async def test_concurrent_settle_and_release_finalise_exactly_once(
    ledger: Ledger, db_path: str
) -> None:
    f = await fund(ledger, "alice", 100_000)
    res = await ledger.reserve("a", f.key, "m", PRICES, 10_000)
    await asyncio.gather(
        ledger.settle(res, 100, 100, 0, "usage"),
        ledger.release(res, "error"),
        ledger.settle(res, 100, 100, 0, "bytes"),
    )
    await ledger.flush()
    assert len(_finals(db_path, res.id)) == 1


def _usage_money(db_path: str, reservation_id: int) -> tuple[int, ...] | None:
    return db.one(
        db_path,
        "SELECT charge_micro, unrecovered_micro FROM usage WHERE reservation_id = ?",
        (reservation_id,),
    )


@pytest.mark.sqlite_only
async def test_usage_above_the_reservation_is_charged_in_full_when_the_balance_covers_it(
    ledger: Ledger, db_path: str
) -> None:
    f = await fund(ledger, "alice", 5000)
    res = await ledger.reserve("a", f.key, "m", PRICES, 1000)
    assert await ledger.settle(res, 0, 1500, 0, "usage") == 3000  # 1500 out * $2/M
    # The extra is debited in memory at once (a debit never waits for the commit).
    assert ledger.available_micro(f.account_id) == 5000 - 3000
    await ledger.flush()
    assert _db_balance(db_path, f.account_id) == (2000, 2000)
    assert _usage_money(db_path, res.id) == (3000, 0)
    report = await ledger.verify()
    assert report.ok and report.unrecovered_micro == 0


@pytest.mark.parametrize(("balance", "collected"), [(1000, 0), (2000, 1000), (2999, 1999)])
async def test_usage_above_what_the_balance_holds_stops_at_zero_and_the_rest_is_unrecovered(
    ledger: Ledger, db_path: str, balance: int, collected: int
) -> None:
    f = await fund(ledger, "alice", balance)
    res = await ledger.reserve("a", f.key, "m", PRICES, 1000)
    assert await ledger.settle(res, 0, 1500, 0, "usage") == 3000
    # Until the commit decides, nothing more may be reserved on money the extra may take.
    with pytest.raises(InsufficientBalance):
        await ledger.reserve("b", f.key, "m", PRICES, 1)
    await ledger.flush()
    assert _db_balance(db_path, f.account_id) == (0, 0)
    assert ledger.available_micro(f.account_id) == 0
    charged, unrecovered = _usage_money(db_path, res.id)
    assert (charged, unrecovered) == (1000 + collected, 3000 - 1000 - collected)
    assert await ledger.charge_taken(res) == charged  # what billing logs, not the 3000 price
    report = await ledger.verify()
    assert report.ok and report.unrecovered_micro == unrecovered
    # verify checks where unrecovered may appear
    db.execute(db_path, "UPDATE usage SET source = 'recovered' WHERE reservation_id = ?", (res.id,))
    [problem] = (await ledger.verify()).mismatches
    assert f"{unrecovered} unrecovered" in problem.detail
    [group] = await ledger.usage()
    assert (group.charge_micro, group.unrecovered_micro) == (charged, unrecovered)


@pytest.mark.sqlite_only
async def test_a_reservation_admitted_before_the_settlement_is_paid_first(
    ledger: Ledger, db_path: str
) -> None:
    """The cap reads the balance inside the settlement's own transaction, not a stale one."""
    f = await fund(ledger, "alice", 2000)
    first = await ledger.reserve("a", f.key, "m", PRICES, 1000)
    # Runs at once up to its wait for the commit: "b" is held in memory, not committed.
    second = asyncio.Task(
        ledger.reserve("b", f.key, "m", PRICES, 1000),
        loop=asyncio.get_running_loop(),
        eager_start=True,
    )
    assert ledger.available_micro(f.account_id) == 0 and not second.done()
    await ledger.settle(first, 0, 1500, 0, "usage")  # committed with or after "b"
    await second
    await ledger.flush()
    assert _db_balance(db_path, f.account_id) == (0, 0)
    assert _usage_money(db_path, first.id) == (1000, 2000)
    assert (await ledger.verify()).ok


async def test_bytes_fallback_source_is_recorded(ledger: Ledger, db_path: str) -> None:
    f = await fund(ledger, "alice", 100_000)
    res = await ledger.reserve("a", f.key, "m", PRICES, 10_000)
    await ledger.settle(res, 100, 40, 0, "bytes", status="no usage block")
    await ledger.flush()
    assert db.one(
        db_path, "SELECT source, status FROM usage WHERE reservation_id = ?", (res.id,)
    ) == ("bytes", "no usage block")


async def test_invalid_settle_leaves_the_reservation_open(ledger: Ledger) -> None:
    f = await fund(ledger, "alice", 100_000)
    res = await ledger.reserve("a", f.key, "m", PRICES, 10_000)
    with pytest.raises(ValueError):
        await ledger.settle(res, 10, 10, 11, "usage")  # more cached than prompt
    with pytest.raises(ValueError):
        await ledger.settle(res, 10, 10, 0, "recovered")  # not a caller's source
    assert res.state == "open"
    assert await ledger.settle(res, 10, 10, 0, "usage") > 0


async def test_reserve_refuses_bad_input_and_unknown_accounts(ledger: Ledger) -> None:
    f = await fund(ledger, "alice", 100)
    with pytest.raises(ValueError):
        await ledger.reserve("a", f.key, "m", PRICES, -1)
    with pytest.raises(ValueError):
        await ledger.reserve("a", f.key, "m", PRICES, 1.5)  # type: ignore[arg-type]
    ghost = ApiKey(key_id=999, account_id=999, label=None, rate_limit=None)
    with pytest.raises(UnknownAccount):
        await ledger.reserve("a", ghost, "m", PRICES, 1)
    assert ledger.available_micro(f.account_id) == 100


async def test_a_reservation_from_elsewhere_is_refused(db_path: str, tmp_path) -> None:
    other = await Ledger.open(str(tmp_path / "other.sqlite3"))
    led = await Ledger.open(db_path)
    try:
        fo = await fund(other, "x", 1000)
        res = await other.reserve("a", fo.key, "m", PRICES, 10)
        with pytest.raises(LedgerError):
            await led.settle(res, 1, 1, 0, "usage")
    finally:
        await led.close()
        await other.close()


@pytest.mark.sqlite_only
async def test_a_cancelled_reserve_is_released_not_left_open(ledger: Ledger) -> None:
    f = await fund(ledger, "alice", 10_000)
    task = asyncio.create_task(ledger.reserve("a", f.key, "m", PRICES, 4000))
    await asyncio.sleep(0)  # let it reach its await on the commit
    assert ledger.available_micro(f.account_id) == 6000  # held
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ledger.flush()  # the reservation commits; its done-callback queues the release
    await ledger.flush()  # ...which this commits
    report = await ledger.verify()
    assert report.ok and not report.open_reservations
    assert ledger.available_micro(f.account_id) == 10_000


@pytest.mark.sqlite_only
async def test_a_refresh_that_finds_nothing_new_does_not_wait_for_the_transaction_lock(
    ledger: Ledger,
) -> None:
    """The group commit holds the lock while a batch commits; the periodic refresh must not
    queue behind it (or make reservations queue behind itself) just to learn nothing changed."""
    await fund(ledger, "alice", 1000)
    async with ledger._txn_lock:  # as a group commit in flight
        checking = asyncio.create_task(ledger.refresh())
        done, _ = await asyncio.wait({checking}, timeout=10)  # bounds a failure only
        assert done, "refresh waited for the transaction lock"
        assert checking.result() is False


@pytest.mark.sqlite_only
async def test_a_topup_from_another_process_is_seen_on_refresh(db_path: str) -> None:
    led = await Ledger.open(db_path, refresh_ms=60_000)
    try:
        f = await fund(led, "alice", 1000)
        store = await Store.open(db_path, create=False)
        assert await store.credit(f.account_id, 5000, "topup", "wire") == 6000
        await store.close()
        assert led.available_micro(f.account_id) == 1000  # not yet noticed
        assert await led.refresh() is True
        assert led.available_micro(f.account_id) == 6000
        assert await led.refresh() is False  # nothing new
        res = await led.reserve("a", f.key, "m", PRICES, 6000)
        assert res.amount_micro == 6000
    finally:
        await led.close()


@pytest.mark.sqlite_only
async def test_holds_survive_a_refresh(db_path: str) -> None:
    led = await Ledger.open(db_path, refresh_ms=60_000)
    try:
        f = await fund(led, "alice", 10_000)
        res = await led.reserve("a", f.key, "m", PRICES, 3000)
        await led.settle(res, 0, 2000, 0, "usage")  # charge 4000: 1000 above the hold
        store = await Store.open(db_path, create=False)
        await store.credit(f.account_id, 1, "topup", None)
        await store.close()
        await led.refresh()  # the queued overrun is still held in memory
        assert led.available_micro(f.account_id) == 10_000 + 1 - 4000
        await led.flush()
        assert led.available_micro(f.account_id) == 10_000 + 1 - 4000
    finally:
        await led.close()


@pytest.mark.sqlite_only
async def test_only_one_process_may_serve_from_a_ledger(db_path: str) -> None:
    led = await Ledger.open(db_path)
    try:
        with pytest.raises(LedgerLocked):
            await Ledger.open(db_path)
        store = await Store.open(db_path, create=False)  # the operator's commands still work
        await store.create_account("bob")
        await store.close()
    finally:
        await led.close()
    await (await Ledger.open(db_path)).close()  # free again after close


@pytest.mark.sqlite_only
async def test_a_reservation_that_cannot_be_committed_fails_closed(
    ledger: Ledger, db_path: str
) -> None:
    f = await fund(ledger, "alice", 10_000)
    with sqlite3.connect(db_path) as conn:  # make every entry insert fail
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON entries "
            "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )
    with pytest.raises(LedgerUnavailable):
        await ledger.reserve("a", f.key, "m", PRICES, 4000)
    assert ledger.available_micro(f.account_id) == 10_000  # the hold was undone
    with sqlite3.connect(db_path) as conn:
        conn.execute("DROP TRIGGER boom")
    res = await ledger.reserve("b", f.key, "m", PRICES, 4000)
    assert res.amount_micro == 4000


@pytest.mark.sqlite_only
async def test_a_settlement_that_fails_to_commit_is_retried(db_path: str) -> None:
    led = await Ledger.open(db_path, busy_timeout_ms=50)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        f = await fund(led, "alice", 10_000)
        res = await led.reserve("a", f.key, "m", PRICES, 4000)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock: "database is locked"
        charge = await led.settle(res, 1000, 0, 0, "usage")
        with pytest.raises(LedgerUnavailable):
            await led.flush()
        assert _finals(db_path, res.id) == []
        other.execute("ROLLBACK")
        await led.flush()  # the queued settlement is retried and lands
        assert _finals(db_path, res.id) == [("settlement", 4000 - charge)]
        assert led.available_micro(f.account_id) == 10_000 - charge
    finally:
        other.close()
        await led.close()


async def test_closed_ledger_refuses_work(db_path: str) -> None:
    led = await Ledger.open(db_path)
    f = await fund(led, "alice", 10_000)
    await led.close()
    with pytest.raises(LedgerUnavailable):
        await led.reserve("a", f.key, "m", PRICES, 1)


def _usage_state(db_path: str, reservation_id: int) -> str:
    row = db.one(db_path, "SELECT state FROM usage WHERE reservation_id = ?", (reservation_id,))
    assert row is not None
    return str(row[0])


async def test_a_settlement_rides_with_the_next_reservations_commit(db_path: str) -> None:
    led = await Ledger.open(db_path, settle_linger_ms=3_600_000)  # only a reservation moves it
    try:
        f = await fund(led, "alice", 100_000)
        first = await led.reserve("a", f.key, "m", PRICES, 10_000)
        await led.settle(first, 1000, 0, 0, "usage")
        await asyncio.sleep(0)  # let any commit that would start on its own start
        assert _usage_state(db_path, first.id) == "open"  # nobody waits for it
        if led._writer._drainer is not None:  # "a"'s commit fully back: "b" is not a
            await led._writer._drainer  # follow-up of it (tests/ledger/test_express.py)
        commits = led._writer.commits
        await led.reserve("b", f.key, "m", PRICES, 10_000)
        assert led._writer.commits == commits + 1  # one commit for both
        assert _usage_state(db_path, first.id) == "settled"
    finally:
        await led.close()


async def test_a_lone_settlement_commits_after_the_linger(db_path: str) -> None:
    led = await Ledger.open(db_path, settle_linger_ms=20)
    try:
        f = await fund(led, "alice", 100_000)
        res = await led.reserve("a", f.key, "m", PRICES, 10_000)
        committed = asyncio.Event()
        commit = led._writer._commit

        async def spy(batch: list) -> None:
            await commit(batch)
            committed.set()

        led._writer._commit = spy  # type: ignore[method-assign]
        await led.settle(res, 1000, 0, 0, "usage")
        assert _usage_state(db_path, res.id) == "open"  # queued, not yet committed
        await asyncio.wait_for(committed.wait(), 10)  # nothing else would commit it
        assert _usage_state(db_path, res.id) == "settled"
    finally:
        await led.close()


async def test_close_commits_lingering_settlements(db_path: str) -> None:
    led = await Ledger.open(db_path, settle_linger_ms=3_600_000)
    f = await fund(led, "alice", 100_000)
    res = await led.reserve("a", f.key, "m", PRICES, 10_000)
    charge = await led.settle(res, 1000, 0, 0, "usage")
    assert _usage_state(db_path, res.id) == "open"
    await led.close()
    assert _usage_state(db_path, res.id) == "settled"
    assert _db_balance(db_path, f.account_id) == (100_000 - charge, 100_000 - charge)


async def test_a_lingering_settlement_never_causes_a_402(db_path: str) -> None:
    """Its unused hold is not spendable until committed: a reservation that needs it
    commits the lingering settlement first instead of being refused."""
    led = await Ledger.open(db_path, settle_linger_ms=3_600_000)
    try:
        f = await fund(led, "alice", 10_000)
        res = await led.reserve("a", f.key, "m", PRICES, 9_000)
        charge = await led.settle(res, 1000, 0, 0, "usage")
        assert led.available_micro(f.account_id) == 1_000  # still held in memory
        again = await led.reserve("b", f.key, "m", PRICES, 9_000)
        assert again.amount_micro == 9_000
        assert _usage_state(db_path, res.id) == "settled"
        assert led.available_micro(f.account_id) == 10_000 - charge - 9_000
        with pytest.raises(InsufficientBalance):  # a genuine shortfall is still refused
            await led.reserve("c", f.key, "m", PRICES, 9_000)
    finally:
        await led.close()


@pytest.mark.sqlite_only
@pytest.mark.parametrize(("mode", "pragma"), [("FULL", 2), ("NORMAL", 1)])
async def test_the_writer_uses_the_configured_sync_mode(db_path: str, mode: str, pragma: int):
    led = await Ledger.open(db_path, synchronous=mode)
    try:
        cur = await led._store.db.execute("PRAGMA synchronous")
        assert (await cur.fetchone())[0] == pragma
    finally:
        await led.close()


async def test_a_reserve_given_up_before_its_commit_lands_is_released(ledger: Ledger) -> None:
    """The request is cancelled (client gone, or the deadline) while its reservation waits in
    the group commit: the reservation commits all the same and the writer releases it, on
    both stores (PostgreSQL: the writer's ``abandoned`` callback, the waiter awaits the
    commit's own future)."""
    f = await fund(ledger, "alice", 10_000)
    task = asyncio.create_task(ledger.reserve("a", f.key, "m", PRICES, 4000))
    await asyncio.sleep(0)  # let it reach its await on the commit
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(3):  # the commit, then the release it queued
        await ledger.flush()
    report = await ledger.verify()
    assert report.ok and not report.open_reservations
    account = await ledger.account(f.account_id)
    assert account is not None and account.balance_micro == 10_000
    assert await ledger.open_reservations(f.account_id) == []
