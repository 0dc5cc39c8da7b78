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


# Multi-row statements, portable to both stores: a batch of receipts or outcomes is one
# statement, not one per row (each a parse-bind-execute the database pays for: ~0.5 ms of
# PostgreSQL's CPU per chat before). At most MAX_PARAMS host parameters each (SQLite's limit).
MAX_PARAMS = 999
_RECEIPT_ROW = "(?, ?, ?, ?, ?, ?)"
UPSERT_RECEIPTS = (
    "INSERT INTO receipts (id, key_id, request_id, revision, created_ms, document) "
    "VALUES {rows} "
    "ON CONFLICT(id) DO UPDATE SET revision = excluded.revision, document = excluded.document "
    "WHERE excluded.revision > receipts.revision"
)
SET_SIGNATURES = (
    "UPDATE usage SET signature = v.column2 FROM (VALUES {rows}) AS v "
    "WHERE usage.reservation_id = v.column1"
)


def statements(
    receipts: Sequence[StoredReceipt],
    signatures: Sequence[tuple[int, str]],
) -> list[tuple[str, list[object]]]:
    """Every receipt (a later revision replaces an earlier) and signature outcome, as
    portable statements for one transaction (:meth:`Reports.write_all`).

    Within a batch the newest of each wins (a statement may touch a row only once)."""
    newest: dict[str, StoredReceipt] = {}
    for r in receipts:
        if r.id not in newest or r.revision > newest[r.id].revision:
            newest[r.id] = r
    outcomes = dict(signatures)  # reservation id -> status, the later one kept
    rows = [(r.id, r.key_id, r.request_id, r.revision, r.created_ms, r.document)
            for r in newest.values()]  # fmt: skip
    return _many(UPSERT_RECEIPTS, _RECEIPT_ROW, rows) + _many(
        SET_SIGNATURES, "(?, ?)", list(outcomes.items())
    )


def _many(sql: str, row: str, rows: list[tuple[object, ...]]) -> list[tuple[str, list[object]]]:
    """One statement per MAX_PARAMS host parameters' worth of rows."""
    per = MAX_PARAMS // row.count("?")
    return [
        (sql.format(rows=", ".join([row] * len(chunk))), [v for r in chunk for v in r])
        for chunk in (rows[start : start + per] for start in range(0, len(rows), per))
    ]


async def read(store: Reports, receipt_id: str, key_id: int) -> str | None:
    """The receipt's signed JSON, only for the key that made the request."""
    rows = await store.fetch(
        "SELECT document FROM receipts WHERE id = ? AND key_id = ?", (receipt_id, key_id)
    )
    return str(rows[0][0]) if rows else None
