"""The write batch runs as one function on aiosqlite's thread: one transaction, all or nothing."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import aiosqlite
import pytest

from teegate.ledger import Store
from teegate.ledger.dbthread import run_on_connection, transaction
from teegate.ledger.ops import NewReservation
from tests.support.ledger import PRICES

pytestmark = pytest.mark.sqlite_only  # SQLite mechanics; tests/ledger/test_pg.py has PG's


def _reservation(account_id: int, key_id: int, amount: int) -> NewReservation:
    return NewReservation(
        request_id="req",
        account_id=account_id,
        key_id=key_id,
        model="m",
        prices=PRICES,
        amount_micro=amount,
        created_ms=1,
    )


async def test_runs_on_the_connections_thread_not_the_loops(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.sqlite3") as db:
        first = await run_on_connection(db, lambda conn: threading.get_ident())
        second = await run_on_connection(
            db, lambda conn: (threading.get_ident(), conn.execute("SELECT 41 + 1").fetchone()[0])
        )
    assert first != threading.get_ident()
    assert second == (first, 42)


async def test_closed_connection_refuses(tmp_path: Path) -> None:
    db = await aiosqlite.connect(tmp_path / "t.sqlite3")
    await db.close()
    with pytest.raises(ValueError):
        await run_on_connection(db, lambda conn: None)


async def test_transaction_rolls_back_when_the_function_raises(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.sqlite3", isolation_level=None) as db:
        await db.execute("CREATE TABLE t (x INTEGER)")

        def insert_then_fail(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await run_on_connection(db, lambda conn: transaction(conn, insert_then_fail))
        assert not db.in_transaction
        assert list(await db.execute_fetchall("SELECT COUNT(*) FROM t")) == [(0,)]
        await run_on_connection(
            db, lambda conn: transaction(conn, lambda c: c.execute("INSERT INTO t VALUES (2)"))
        )
        assert list(await db.execute_fetchall("SELECT x FROM t")) == [(2,)]


async def test_failed_batch_leaves_no_trace_and_the_next_one_commits(db_path: str) -> None:
    store = await Store.open(db_path)
    try:
        account = await store.create_account("a", 1_000_000)
        key, _ = await store.create_key(account.id)
        before = await store.verify()
        with pytest.raises(sqlite3.IntegrityError):
            # The second reservation's entry would be positive: a CHECK rejects it.
            await store.apply_batch(
                [
                    _reservation(account.id, key.key_id, 100),
                    _reservation(account.id, key.key_id, -5),
                ],
                [],
            )
        assert not store.db.in_transaction
        assert (await store.require_account(account.id)).balance_micro == 1_000_000
        assert await store.open_reservations() == []
        ids, balances = await store.apply_batch([_reservation(account.id, key.key_id, 100)], [])
        assert balances == {account.id: 999_900}
        assert [r.reservation_id for r in await store.open_reservations()] == ids
        after = await store.verify()
        assert before.ok and after.ok
    finally:
        await store.close()
