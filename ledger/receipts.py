"""Receipts and signature outcomes: written in batches, read only by the key that owns one.

The request path hands these over off the response path (:mod:`teegate.addons.receipts`
buffers them and writes each batch in one transaction), so a chat costs no extra commit of
its own. A receipt is stored whole (its signed JSON, hashes only) and replaced by a later
revision; a usage row gets the outcome of its response-signature check. The SQL is portable:
it runs on the SQLite and the PostgreSQL store alike (:meth:`Reports.fetch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from teegate.ledger.reports import Reports


@dataclass(frozen=True, slots=True)
class StoredReceipt:
    id: str
    key_id: int
    request_id: str
    revision: int
    created_ms: int
    document: str


UPSERT_RECEIPT = (
    "INSERT INTO receipts (id, key_id, request_id, revision, created_ms, document) "
    "VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET revision = excluded.revision, document = excluded.document "
    "WHERE excluded.revision > receipts.revision"
)
SET_SIGNATURE = "UPDATE usage SET signature = ? WHERE reservation_id = ?"


async def write(
    store: Reports,
    receipts: Sequence[StoredReceipt],
    signatures: Sequence[tuple[int, str]],
) -> None:
    """Every receipt (a later revision replaces an earlier) and signature outcome, at once."""
    async with store.transaction():
        if receipts:
            await store.execute_many(
                UPSERT_RECEIPT,
                [(r.id, r.key_id, r.request_id, r.revision, r.created_ms, r.document)
                 for r in receipts],
            )  # fmt: skip
        if signatures:
            await store.execute_many(SET_SIGNATURE, [(s, rid) for rid, s in signatures])


async def read(store: Reports, receipt_id: str, key_id: int) -> str | None:
    """The receipt's signed JSON, only for the key that made the request."""
    rows = await store.fetch(
        "SELECT document FROM receipts WHERE id = ? AND key_id = ?", (receipt_id, key_id)
    )
    return str(rows[0][0]) if rows else None
