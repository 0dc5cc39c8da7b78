"""Receipts in the ledger: owner-only reads, later revisions win; signature outcomes per row."""

from __future__ import annotations

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
