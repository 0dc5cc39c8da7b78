"""The ledger's SQLite schema and its ordered migrations.

The schema version is ``PRAGMA user_version``. ``MIGRATIONS[i]`` takes a
database from version ``i`` to ``i + 1``; each runs in its own ``BEGIN
IMMEDIATE`` transaction together with the version bump, so a crash leaves the
database at a whole version and two processes starting at once cannot both
apply one. A database newer than :data:`SCHEMA_VERSION` is refused outright
(:class:`~ledger.errors.SchemaTooNew`): old code must not write to a schema it
does not understand.

Money columns are INTEGER micro-USD; tables are STRICT so a float or text can
never be stored in one. ``entries`` is append-only, enforced by triggers, and
holds the truth; ``accounts.balance_micro`` is a cache of the sum of an
account's entries, updated in the same transaction as each entry.
``usage.charge_micro`` is what was taken from the balance; ``usage.unrecovered_micro``
(version 3) the part of the request's price the balance could not cover.
Version 4: ``entries.idempotency_key`` (a retried top-up finds the entry it already made
instead of crediting twice) and ``admin_tokens`` (the admin API's bearer tokens, hashed).
Version 5: ``usage.signature`` and the ``receipts`` table: what was checked and signed for
each served chat.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiosqlite

from teegate.ledger.errors import SchemaTooNew

Migration = tuple[str, ...]  # statements, executed in order

_V1: Migration = (
    """
    CREATE TABLE accounts (
        id            INTEGER PRIMARY KEY,
        name          TEXT    NOT NULL UNIQUE,
        created_ms    INTEGER NOT NULL,
        balance_micro INTEGER NOT NULL DEFAULT 0  -- cache of SUM(entries.amount_micro)
    ) STRICT
    """,
    """
    CREATE TABLE api_keys (
        id         INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        key_hash   BLOB    NOT NULL UNIQUE CHECK (length(key_hash) = 32),
        label      TEXT,
        rate_limit INTEGER CHECK (rate_limit IS NULL OR rate_limit > 0),
        created_ms INTEGER NOT NULL,
        revoked_ms INTEGER
    ) STRICT
    """,
    """
    CREATE TABLE entries (
        id             INTEGER PRIMARY KEY,
        account_id     INTEGER NOT NULL REFERENCES accounts(id),
        kind           TEXT    NOT NULL
                       CHECK (kind IN ('topup', 'reservation', 'settlement', 'release', 'refund')),
        amount_micro   INTEGER NOT NULL,  -- signed change to the balance
        reservation_id INTEGER REFERENCES entries(id),
        created_ms     INTEGER NOT NULL,
        note           TEXT,
        CHECK ((kind IN ('settlement', 'release')) = (reservation_id IS NOT NULL)),
        CHECK (kind NOT IN ('topup', 'refund') OR amount_micro > 0),
        CHECK (kind <> 'reservation' OR amount_micro <= 0),
        CHECK (kind <> 'release' OR amount_micro >= 0)
    ) STRICT
    """,
    # At most one settlement or release per reservation, whoever writes it.
    "CREATE UNIQUE INDEX entries_final_once ON entries(reservation_id) "
    "WHERE reservation_id IS NOT NULL",
    "CREATE INDEX entries_account ON entries(account_id)",
    """
    CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END
    """,
    """
    CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END
    """,
    """
    CREATE TABLE usage (
        reservation_id    INTEGER PRIMARY KEY REFERENCES entries(id),
        request_id        TEXT    NOT NULL,
        account_id        INTEGER NOT NULL REFERENCES accounts(id),
        key_id            INTEGER NOT NULL REFERENCES api_keys(id),
        model             TEXT    NOT NULL,
        price_input       INTEGER NOT NULL,
        price_output      INTEGER NOT NULL,
        price_cache_read  INTEGER,
        reserved_micro    INTEGER NOT NULL,
        state             TEXT    NOT NULL CHECK (state IN ('open', 'settled', 'released')),
        prompt_tokens     INTEGER,
        completion_tokens INTEGER,
        cached_tokens     INTEGER,
        charge_micro      INTEGER,
        source            TEXT CHECK (source IS NULL OR source IN ('usage', 'bytes', 'recovered')),
        status            TEXT,
        start_ms          INTEGER,
        first_byte_ms     INTEGER,
        end_ms            INTEGER,
        created_ms        INTEGER NOT NULL,
        finalized_ms      INTEGER
    ) STRICT
    """,
)

_V2: Migration = (
    # Reports filter by time/account/key; start-up recovery looks for open rows.
    "CREATE INDEX usage_created ON usage(created_ms)",
    "CREATE INDEX usage_account ON usage(account_id, created_ms)",
    "CREATE INDEX usage_key ON usage(key_id, created_ms)",
    "CREATE INDEX usage_open ON usage(state) WHERE state = 'open'",
    "CREATE INDEX api_keys_account ON api_keys(account_id)",
)

_V3: Migration = (
    # Usage above a reservation is charged only up to what the account has; the part
    # of its price the balance could not cover is recorded here (see ledger.ledger).
    "ALTER TABLE usage ADD COLUMN unrecovered_micro INTEGER NOT NULL DEFAULT 0 "
    "CHECK (unrecovered_micro >= 0)",
)

_V4: Migration = (
    # A top-up sent with an idempotency key credits once, however often it is retried: the
    # unique index makes the second insert impossible, and the store finds the first entry.
    "ALTER TABLE entries ADD COLUMN idempotency_key TEXT",
    "CREATE UNIQUE INDEX entries_idempotency ON entries(idempotency_key) "
    "WHERE idempotency_key IS NOT NULL",
    # Bearer tokens of the admin listener's API; like API keys, only their SHA-256 is kept.
    """
    CREATE TABLE admin_tokens (
        id         INTEGER PRIMARY KEY,
        token_hash BLOB    NOT NULL UNIQUE CHECK (length(token_hash) = 32),
        label      TEXT,
        created_ms INTEGER NOT NULL,
        revoked_ms INTEGER
    ) STRICT
    """,
)

_V5: Migration = (
    # Whether the upstream's response signature was checked, per request (see
    # teegate.catalog.attestation.signature); NULL: none was expected (flag mode, Chutes).
    "ALTER TABLE usage ADD COLUMN signature TEXT CHECK (signature IS NULL OR "
    "signature IN ('pending', 'verified', 'missing', 'failed', 'unchecked'))",
    # Signed receipts handed to clients: hashes and the verdict relied on, never content.
    # Only the key that made the request may read one (key_id).
    """
    CREATE TABLE receipts (
        id         TEXT    PRIMARY KEY,
        key_id     INTEGER NOT NULL REFERENCES api_keys(id),
        request_id TEXT    NOT NULL,
        revision   INTEGER NOT NULL CHECK (revision >= 1),
        created_ms INTEGER NOT NULL,
        document   TEXT    NOT NULL
    ) STRICT
    """,
)

MIGRATIONS: tuple[Migration, ...] = (_V1, _V2, _V3, _V4, _V5)
SCHEMA_VERSION = len(MIGRATIONS)


async def configure(
    db: aiosqlite.Connection, *, synchronous: str = "FULL", busy_timeout_ms: int = 10_000
) -> None:
    """Connection settings every ledger connection uses.

    WAL lets the operator's commands read (and briefly write) while the proxy
    serves; ``busy_timeout`` makes writers queue instead of failing at once;
    ``synchronous=FULL`` fsyncs the WAL at every commit, so a committed
    reservation survives power loss, not just a process crash.
    """
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
    await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    await db.execute("PRAGMA foreign_keys = ON")
    cur = await db.execute("PRAGMA journal_mode = WAL")
    row = await cur.fetchone()
    if row is None or str(row[0]).lower() != "wal":
        raise RuntimeError(f"could not switch the ledger to WAL mode (got {row!r})")
    await db.execute(f"PRAGMA synchronous = {synchronous}")


async def user_version(db: aiosqlite.Connection) -> int:
    cur = await db.execute("PRAGMA user_version")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(
    db: aiosqlite.Connection,
    path: str,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> int:
    """Bring the database up to ``len(migrations)``; return the version reached.

    Raises :class:`SchemaTooNew` (before writing anything) when the database
    is already beyond what ``migrations`` describe.
    """
    known = len(migrations)
    while True:
        current = await user_version(db)
        if current > known:
            raise SchemaTooNew(path, current, known)
        if current == known:
            return current
        await db.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated.
            current = await user_version(db)
            if current > known:
                raise SchemaTooNew(path, current, known)
            if current < known:
                for statement in migrations[current]:
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {current + 1}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
