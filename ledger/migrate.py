"""Copy an SQLite ledger into an empty PostgreSQL ledger, and prove the copy whole.

Used by ``teegate ledger migrate --to postgresql://...``. The SQLite file must
not be served meanwhile: the copy takes its serving lock
(:class:`~teegate.ledger.lockfile.WriterLock`), so a running gateway makes it
refuse rather than copy a ledger that is still moving, and reads everything in
one read transaction (one snapshot). The target must hold no ledger rows yet;
everything is written in one PostgreSQL transaction, so a failed copy leaves it
empty.

Rows keep their ids (keys, accounts, reservations keep their numbers in
reports and logs); the identity sequences continue after the highest.
Reservations still open in the file are copied open and without a worker, so
the first PostgreSQL worker's sweeper charges them in full: the crash rule,
which is what they are (the SQLite gateway is stopped). Rate-limit windows are
not copied. Idempotency keys, admin tokens (hashes), receipts and signature
outcomes are: a top-up retried after the move is still recognised.

The check after the copy: PostgreSQL's own ``verify`` is clean, every table
holds as many rows as the file's, and every account's balance and entry sum
equal the file's.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from teegate.ledger.errors import InvalidInput
from teegate.ledger.lockfile import WriterLock
from teegate.ledger.pgstore import PgStore
from teegate.ledger.schema import SCHEMA_VERSION
from teegate.ledger.store import Store

# Column lists shared by both schemas (SQLite version 5, PostgreSQL version 2), in an
# order that satisfies the foreign keys.
TABLES: dict[str, tuple[str, ...]] = {
    "accounts": ("id", "name", "created_ms", "balance_micro"),
    "api_keys": (
        "id", "account_id", "key_hash", "label", "rate_limit", "created_ms", "revoked_ms",
    ),
    "entries": (
        "id", "account_id", "kind", "amount_micro", "reservation_id", "created_ms", "note",
        "idempotency_key",
    ),
    "usage": (
        "reservation_id", "request_id", "account_id", "key_id", "model", "price_input",
        "price_output", "price_cache_read", "reserved_micro", "state", "prompt_tokens",
        "completion_tokens", "cached_tokens", "charge_micro", "source", "status", "start_ms",
        "first_byte_ms", "end_ms", "created_ms", "finalized_ms", "unrecovered_micro",
        "signature",
    ),
    "admin_tokens": ("id", "token_hash", "label", "created_ms", "revoked_ms"),
    "receipts": ("id", "key_id", "request_id", "revision", "created_ms", "document"),
}  # fmt: skip
_ORDER = {"usage": "reservation_id"}
_IDENTITY = ("accounts", "api_keys", "entries", "admin_tokens")  # receipts' ids are text


@dataclass
class MigrationReport:
    copied: dict[str, int]
    problems: list[str] = field(default_factory=list)
    open_reservations: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


async def migrate_sqlite_to_postgres(path: str, url: str) -> MigrationReport:
    """Copy the SQLite ledger at ``path`` into the (empty) PostgreSQL ledger at ``url``."""
    # Opened once through the Store: LedgerNotFound for a missing file, and a file of an
    # older schema is migrated first.
    await (await Store.open(path, create=False)).close()
    lock = WriterLock(path)
    lock.acquire()  # LedgerLocked while a gateway serves from the file
    try:
        source = await asyncio.to_thread(_snapshot, path)
        target = await PgStore.open(url)
        try:
            return await _copy(source, target)
        finally:
            await target.close()
    finally:
        lock.release()


def _snapshot(path: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")  # one read snapshot of every table
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:  # pragma: no cover - Store.open migrated it
            raise InvalidInput(f"the SQLite ledger is at schema {version}, not {SCHEMA_VERSION}")
        out = {
            table: conn.execute(
                f"SELECT {', '.join(cols)} FROM {table} ORDER BY {_ORDER.get(table, 'id')}"
            ).fetchall()
            for table, cols in TABLES.items()
        }
        conn.execute("COMMIT")
        return out
    finally:
        conn.close()


async def _copy(source: dict[str, list[tuple[Any, ...]]], target: PgStore) -> MigrationReport:
    async with target.transaction() as db:
        for table in TABLES:
            cur = await db.execute(f"SELECT EXISTS (SELECT 1 FROM {table})")
            row = await cur.fetchone()
            if row and row[0]:
                raise InvalidInput(
                    f"the PostgreSQL ledger already has {table}; migrate into an empty one"
                )
        for table, cols in TABLES.items():
            async with db.cursor() as cur:
                async with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                    for r in source[table]:
                        await copy.write_row(r)
        for table in _IDENTITY:
            await db.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            )
    return await _check(source, target)


async def _check(source: dict[str, list[tuple[Any, ...]]], target: PgStore) -> MigrationReport:
    copied = {t: len(rows) for t, rows in source.items()}
    report = MigrationReport(copied=copied)
    for table in TABLES:
        (n,) = (await target._rows(f"SELECT COUNT(*) FROM {table}"))[0]
        if n != copied[table]:
            report.problems.append(f"{table}: {copied[table]} rows in SQLite, {n} in PostgreSQL")
    sums: dict[int, int] = {}
    for entry in source["entries"]:
        sums[entry[1]] = sums.get(entry[1], 0) + entry[3]
    pg_balances = await target.balances()
    pg_sums = dict(
        await target._rows(
            "SELECT account_id, COALESCE(SUM(amount_micro), 0) FROM entries GROUP BY account_id"
        )
    )
    for account_id, _name, _created, balance in source["accounts"]:
        if pg_balances.get(account_id) != balance:
            report.problems.append(
                f"account {account_id}: balance {balance} in SQLite, "
                f"{pg_balances.get(account_id)} in PostgreSQL"
            )
        if pg_sums.get(account_id, 0) != sums.get(account_id, 0):
            report.problems.append(f"account {account_id}: entries sum differently")
    verify = await target.verify()
    report.problems += [f"verify: {m.detail}" for m in verify.mismatches]
    report.open_reservations = len(verify.open_reservations)
    return report
