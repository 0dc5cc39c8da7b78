"""Schema creation, ordered migration, and refusal of a newer schema."""

from __future__ import annotations

import sqlite3

import aiosqlite
import pytest

from teegate.ledger import Ledger, SchemaTooNew, Store
from teegate.ledger.schema import MIGRATIONS, SCHEMA_VERSION, configure, migrate

pytestmark = pytest.mark.sqlite_only  # SQLite mechanics; tests/ledger/test_pg.py has PG's


def _version(path: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def _indexes(path: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    return {r[0] for r in rows}


async def test_new_database_is_created_at_the_latest_version_in_wal_mode(db_path: str) -> None:
    store = await Store.open(db_path)
    await store.close()
    assert _version(db_path) == SCHEMA_VERSION == len(MIGRATIONS)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_an_older_database_is_migrated_in_order_keeping_its_data(db_path: str) -> None:
    # Build a version-1 database (only the first migration) and put data in it.
    db = await aiosqlite.connect(db_path, isolation_level=None)
    await configure(db)
    assert await migrate(db, db_path, MIGRATIONS[:1]) == 1
    await db.execute("INSERT INTO accounts (name, created_ms) VALUES ('old', 1)")
    await db.close()
    assert _version(db_path) == 1
    assert "usage_open" not in _indexes(db_path)

    led = await Ledger.open(db_path)
    try:
        assert (await led.account("old")) is not None
    finally:
        await led.close()
    assert _version(db_path) == SCHEMA_VERSION
    assert "usage_open" in _indexes(db_path)


async def test_a_newer_schema_stops_the_start_with_a_clear_error(db_path: str) -> None:
    await (await Store.open(db_path)).close()  # create at the current version
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew) as err:
        await Ledger.open(db_path)
    message = str(err.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"up to {SCHEMA_VERSION}" in message
    assert _version(db_path) == SCHEMA_VERSION + 1  # untouched
    # The serving lock was released on the way out: a fixed database opens again.
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    await (await Ledger.open(db_path)).close()


async def test_entries_are_append_only_in_the_database_itself(db_path: str) -> None:
    led = await Ledger.open(db_path)
    await led.create_account("a", topup_micro=5)
    await led.close()
    with sqlite3.connect(db_path) as conn:
        for sql in ("UPDATE entries SET amount_micro = 999", "DELETE FROM entries"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)
        # Money columns are STRICT integers: a float cannot be stored.
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(
                "INSERT INTO entries (account_id, kind, amount_micro, created_ms) "
                "VALUES (1, 'topup', 1.5, 0)"
            )


async def test_a_version_2_database_with_settled_usage_upgrades_and_still_verifies(
    db_path: str,
) -> None:
    """Version 3 adds usage.unrecovered_micro; existing rows read 0 and reconcile as before."""
    db = await aiosqlite.connect(db_path, isolation_level=None)
    await configure(db)
    assert await migrate(db, db_path, MIGRATIONS[:2]) == 2
    for sql in (
        "INSERT INTO accounts (id, name, created_ms, balance_micro) VALUES (1, 'old', 1, 700)",
        "INSERT INTO api_keys (id, account_id, key_hash, created_ms) "
        "VALUES (1, 1, zeroblob(32), 1)",
        "INSERT INTO entries VALUES (1, 1, 'topup', 1000, NULL, 1, NULL)",
        "INSERT INTO entries VALUES (2, 1, 'reservation', -500, NULL, 2, NULL)",
        "INSERT INTO entries VALUES (3, 1, 'settlement', 200, 2, 3, NULL)",
        "INSERT INTO usage (reservation_id, request_id, account_id, key_id, model, price_input, "
        "price_output, reserved_micro, state, charge_micro, source, created_ms) "
        "VALUES (2, 'r', 1, 1, 'm', 1, 1, 500, 'settled', 300, 'usage', 2)",
    ):
        await db.execute(sql)
    await db.close()

    led = await Ledger.open(db_path)
    try:
        report = await led.verify()
        assert report.ok and report.unrecovered_micro == 0
        [group] = await led.usage()
        assert (group.charge_micro, group.unrecovered_micro) == (300, 0)
    finally:
        await led.close()
    assert _version(db_path) == SCHEMA_VERSION == 5
    with sqlite3.connect(db_path) as conn:
        with pytest.raises(sqlite3.IntegrityError):  # never negative
            conn.execute("UPDATE usage SET unrecovered_micro = -1")
