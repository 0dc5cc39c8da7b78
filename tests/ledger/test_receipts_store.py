"""Receipts in the ledger: owner-only reads, later revisions win; signature outcomes per row."""

from __future__ import annotations

import asyncio

import pytest

from teegate.ledger import Ledger, Prices
from teegate.ledger.receipts import StoredReceipt
from tests.support.ledger import fund
from tests.support.ledgerdb import execute, rows


def _r(rid: str, key_id: int, revision: int, doc: str) -> StoredReceipt:
    return StoredReceipt(rid, key_id, "req-1", revision, 1, doc)


async def test_receipts_owner_only_and_revisions(ledger: Ledger, db_path: str) -> None:
    alice = await fund(ledger, "alice", 10_000_000)
    bob = await fund(ledger, "bob", 10_000_000)
    res = await ledger.reserve("req-1", alice.key, "m", Prices(1, 1), 1000)
    first = _r("rcpt_1", alice.key.key_id, 1, '{"v":1}')
    await ledger.write_receipts([first], [(res.id, "pending")])
    assert await ledger.receipt("rcpt_1", alice.key.key_id) == '{"v":1}'
    assert await ledger.receipt("rcpt_1", bob.key.key_id) is None
    assert await ledger.receipt("rcpt_2", alice.key.key_id) is None
    # A later revision replaces it; an earlier one arriving late does not.
    second = _r("rcpt_1", alice.key.key_id, 2, '{"v":2}')
    await ledger.write_receipts([second], [(res.id, "verified")])
    await ledger.write_receipts([first], [])
    assert await ledger.receipt("rcpt_1", alice.key.key_id) == '{"v":2}'
    await ledger.settle(res, prompt_tokens=1, completion_tokens=1, cached_tokens=0,
                        source="usage")  # fmt: skip
    await ledger.flush()
    assert rows(db_path, "SELECT signature, state FROM usage") == [("verified", "settled")]
    with pytest.raises(Exception, match="(?i)check"):  # sqlite3 and psycopg alike
        execute(db_path, "UPDATE usage SET signature = 'maybe'")


async def test_a_large_batch_is_written_whole_newest_winning(ledger: Ledger, db_path: str) -> None:
    """More rows than one statement takes (chunked), and the same receipt or reservation twice
    in one batch (one multi-row statement may touch a row only once: the newest is kept)."""
    alice = await fund(ledger, "alice", 10_000_000)
    key = alice.key.key_id
    held = [await ledger.reserve(f"req-{i}", alice.key, "m", Prices(1, 1), 10) for i in range(300)]
    stored = [_r(f"rcpt_{i}", key, 1, f'{{"i":{i}}}') for i in range(400)]
    stored += [_r("rcpt_7", key, 2, '{"i":"seven, revised"}'), _r("rcpt_8", key, 1, '{"i":8}')]
    outcomes = [(r.id, "pending") for r in held] + [(r.id, "verified") for r in held[::2]]
    await ledger.write_receipts(stored, outcomes)
    assert rows(db_path, "SELECT count(*) FROM receipts") == [(400,)]
    assert await ledger.receipt("rcpt_7", key) == '{"i":"seven, revised"}'
    assert await ledger.receipt("rcpt_399", key) == '{"i":399}'
    assert rows(db_path, "SELECT signature, count(*) FROM usage GROUP BY signature "
                         "ORDER BY signature") == [("pending", 150), ("verified", 150)]  # fmt: skip


@pytest.mark.sqlite_only
async def test_a_receipt_write_neither_holds_nor_waits_for_the_group_commits_lock(
    ledger: Ledger,
) -> None:
    """Queued on the connection's thread at once and waited for outside the lock: a receipt
    batch never makes a reservation's commit wait, and a group commit holding the lock (its
    transactions are single calls on the thread) does not make the batch wait either."""
    alice = await fund(ledger, "alice", 10_000_000)
    lock = ledger._txn_lock
    writing = asyncio.create_task(
        ledger.write_receipts([_r("rcpt_1", alice.key.key_id, 1, '{"v":1}')], [])
    )
    await asyncio.sleep(0)  # the write has started: queued, its result not back yet
    assert not writing.done()
    assert not lock.locked()
    await writing
    async with lock:  # as a group commit in flight
        writing = asyncio.create_task(
            ledger.write_receipts([_r("rcpt_2", alice.key.key_id, 1, '{"v":2}')], [])
        )
        done, _ = await asyncio.wait({writing}, timeout=10)  # bounds a failure only
        assert done, "the receipt batch waited for the group commit's lock"
    assert await ledger.receipt("rcpt_1", alice.key.key_id) == '{"v":1}'
    assert await ledger.receipt("rcpt_2", alice.key.key_id) == '{"v":2}'


@pytest.mark.sqlite_only
async def test_a_receipt_write_is_never_queued_inside_an_operator_transaction(
    ledger: Ledger, db_path: str
) -> None:
    """An operator's write (several round trips in one transaction on the same connection)
    holds the lock throughout: a receipt batch waits for it and lands after its COMMIT."""
    alice = await fund(ledger, "alice", 10_000_000)
    store = ledger._store
    async with ledger._txn_lock, store.transaction() as db:  # as OperatorStore's writes run
        writing = asyncio.create_task(
            ledger.write_receipts([_r("rcpt_1", alice.key.key_id, 1, '{"v":1}')], [])
        )
        await db.execute("UPDATE accounts SET name = 'alice2' WHERE id = ?", (alice.account_id,))
        assert not writing.done()
    await writing
    assert await ledger.receipt("rcpt_1", alice.key.key_id) == '{"v":1}'
    assert rows(db_path, "SELECT name FROM accounts") == [("alice2",)]
