"""Reservations that arrive while a commit is on the database thread are committed there
right after it, without a turn of the event loop in between (ledger/writer.py, express);
when that follow-up transaction fails they take the ordinary path. SQLite mechanics."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from teegate.ledger import Ledger, LedgerUnavailable, Reservation
from teegate.ledger.dbthread import run_on_connection
from tests.support.ledger import PRICES, fund

# The SQLite writer's express lane; PostgreSQL batches in teegate_apply.
pytestmark = pytest.mark.sqlite_only


async def _hold_the_thread(led: Ledger) -> tuple[threading.Event, asyncio.Task]:
    """Occupy the database thread until the event is set, so the next commit queues behind."""
    go = threading.Event()
    blocker = asyncio.ensure_future(run_on_connection(led._store.db, lambda _c: go.wait(10)))
    await asyncio.sleep(0)
    return go, blocker


async def _until_in_flight(led: Ledger) -> None:
    for _ in range(100):
        if led._writer._express_open:
            return
        await asyncio.sleep(0)
    raise AssertionError("the first commit never started")


async def test_reservations_arriving_during_a_commit_follow_it_on_the_thread(db_path: str):
    led = await Ledger.open(db_path)
    try:
        f = await fund(led, "alice", 10_000)
        go, blocker = await _hold_the_thread(led)
        first = asyncio.ensure_future(led.reserve("r-0", f.key, "m", PRICES, 1000))
        await _until_in_flight(led)  # r-0's commit waits on the thread behind the blocker
        later = [
            asyncio.ensure_future(led.reserve(f"r-{i}", f.key, "m", PRICES, 1000))
            for i in range(1, 6)
        ]
        await asyncio.sleep(0)
        assert len(led._writer._express) == 5  # not queued for a commit of their own
        go.set()
        await blocker
        done = await asyncio.gather(first, *later)
        assert all(isinstance(r, Reservation) for r in done)
        assert led._writer.express_commits == 1  # all five in one follow-up transaction
        assert led.available_micro(f.account_id) == 4000
        report = await led.verify()
        assert report.ok and len(report.open_reservations) == 6
    finally:
        await led.close()


async def test_a_failed_follow_up_falls_back_to_the_ordinary_path(db_path: str):
    """One bad reservation makes the follow-up transaction fail: it is rolled back, the good
    reservation beside it still commits (on the ordinary path), only the bad one is refused."""
    led = await Ledger.open(db_path)
    try:
        f = await fund(led, "alice", 10_000)
        with sqlite3.connect(db_path) as conn:
            conn.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON usage WHEN NEW.model = 'bad' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        go, blocker = await _hold_the_thread(led)
        first = asyncio.ensure_future(led.reserve("first", f.key, "m", PRICES, 1000))
        await _until_in_flight(led)
        dup = asyncio.ensure_future(led.reserve("bad", f.key, "bad", PRICES, 1000))
        good = asyncio.ensure_future(led.reserve("fine", f.key, "m", PRICES, 1000))
        await asyncio.sleep(0)
        go.set()
        await blocker
        assert isinstance(await first, Reservation)
        assert isinstance(await good, Reservation)
        with pytest.raises(LedgerUnavailable):
            await dup
        assert led._writer.express_commits == 0
        assert led.available_micro(f.account_id) == 8000  # the refused hold was given back
        report = await led.verify()
        assert report.ok and len(report.open_reservations) == 2
    finally:
        await led.close()


async def test_a_request_cancelled_while_in_the_express_lane_is_released(db_path: str):
    led = await Ledger.open(db_path)
    try:
        f = await fund(led, "alice", 10_000)
        go, blocker = await _hold_the_thread(led)
        first = asyncio.ensure_future(led.reserve("r-0", f.key, "m", PRICES, 1000))
        await _until_in_flight(led)
        gone = asyncio.ensure_future(led.reserve("r-1", f.key, "m", PRICES, 1000))
        await asyncio.sleep(0)
        gone.cancel()
        go.set()
        await blocker
        await first
        with pytest.raises(asyncio.CancelledError):
            await gone
        await led.flush()  # the release queued as the follow-up landed
        report = await led.verify()
        assert report.ok and len(report.open_reservations) == 1
        assert led.available_micro(f.account_id) == 9000
    finally:
        await led.close()


async def test_many_rows_in_one_statement_land_each_in_its_own_row(db_path: str):
    """Reservations and settlements of one batch are written with multi-row statements
    (ledger/batch.py: insert_rows, finalize_rows): every row gets its own values."""
    led = await Ledger.open(db_path, settle_linger_ms=3_600_000)
    try:
        f = await fund(led, "alice", 10_000_000)
        held = await asyncio.gather(
            *(led.reserve(f"m-{i}", f.key, "m", PRICES, 10_000) for i in range(300))
        )
        for i, res in enumerate(held):  # linger: all 300 commit together at the flush
            await led.settle(res, i + 1, 2 * i + 1, 0, "usage")
        await led.flush()
        with sqlite3.connect(db_path) as conn:
            rows = conn.execute(
                "SELECT request_id, state, prompt_tokens, completion_tokens FROM usage"
            ).fetchall()
        assert len(rows) == 300
        for request_id, state, prompt, completion in rows:
            i = int(request_id.removeprefix("m-"))
            assert (state, prompt, completion) == ("settled", i + 1, 2 * i + 1)
        report = await led.verify()
        assert report.ok and not report.open_reservations
    finally:
        await led.close()
