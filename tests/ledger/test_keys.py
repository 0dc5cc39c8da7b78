"""API keys: shape, hashed-only storage, authentication and revocation."""

from __future__ import annotations

import asyncio
import hashlib
import re
import sqlite3
import time
from pathlib import Path

import pytest

from teegate.ledger import Ledger, Store
from teegate.ledger.keys import hash_key
from tests.support.ledger import fund


def _all_db_bytes(db_path: str) -> bytes:
    """The database file plus its WAL: everything SQLite has written."""
    data = b""
    for suffix in ("", "-wal", "-shm"):
        p = Path(db_path + suffix)
        if p.exists():
            data += p.read_bytes()
    return data


async def test_key_shape_and_authentication(ledger: Ledger) -> None:
    acct = await ledger.create_account("alice")
    key, plaintext = await ledger.create_key(acct.id, label="laptop", rate_limit=60)
    assert re.fullmatch(r"vgpu_sk_[A-Za-z0-9_-]{43,}", plaintext)  # >= 32 random bytes
    assert (key.account_id, key.label, key.rate_limit) == (acct.id, "laptop", 60)
    assert await ledger.authenticate(plaintext) == key
    assert await ledger.authenticate(plaintext) == key  # cached path, same answer
    # Near misses and garbage are simply unknown.
    assert await ledger.authenticate(plaintext[:-1]) is None
    assert await ledger.authenticate(plaintext + "x") is None
    assert await ledger.authenticate("vgpu_sk_" + "A" * 43) is None
    assert await ledger.authenticate("") is None
    assert await ledger.authenticate("sk-" + plaintext[8:]) is None
    assert await ledger.authenticate("vgpu_sk_" + "x" * 10_000) is None
    assert await ledger.authenticate(None) is None  # type: ignore[arg-type]


@pytest.mark.sqlite_only
async def test_keys_are_stored_only_as_hashes(db_path: str) -> None:
    led = await Ledger.open(db_path)
    acct = await led.create_account("alice")
    keys = [(await led.create_key(acct.id))[1] for _ in range(3)]
    for k in keys:
        assert await led.authenticate(k) is not None  # they work...
    await led.close()
    raw = _all_db_bytes(db_path)
    for k in keys:
        assert k.encode() not in raw  # ...but the plaintext is nowhere in the files
        assert k[8:].encode() not in raw  # not even without its prefix
        assert hashlib.sha256(k.encode()).digest() in raw  # only the hash
    # Unique keys, unique hashes.
    with sqlite3.connect(db_path) as conn:
        hashes = {r[0] for r in conn.execute("SELECT key_hash FROM api_keys")}
    assert hashes == {hash_key(k) for k in keys}


async def test_revocation_in_process_is_immediate(ledger: Ledger) -> None:
    f = await fund(ledger, "alice", 1000)
    other_key, other = await ledger.create_key(f.account_id)
    assert await ledger.authenticate(f.plaintext) == f.key  # now cached
    assert await ledger.revoke_key(f.key.key_id) is True
    assert await ledger.authenticate(f.plaintext) is None
    assert await ledger.revoke_key(f.key.key_id) is False  # already revoked
    assert await ledger.authenticate(other) == other_key  # the sibling key still works


async def test_revocation_by_another_process_reaches_the_serving_ledger(db_path: str) -> None:
    """The cache is refreshed from the database: a key revoked elsewhere stops working.

    How soon is the benchmark's question; this waits on the observable condition, with a
    deadline only so that a refresh that never comes fails instead of hanging."""
    led = await Ledger.open(db_path, refresh_ms=50)
    try:
        f = await fund(led, "alice", 1000)
        other_key, other = await led.create_key(f.account_id)
        assert await led.authenticate(f.plaintext) == f.key  # cached
        # The operator's command line uses its own connection (another process's view).
        store = await Store.open(db_path, create=False)
        assert await store.revoke_key(f.key.key_id)
        await store.close()
        deadline = time.monotonic() + 30.0
        while await led.authenticate(f.plaintext) is not None:
            assert time.monotonic() < deadline, "revocation never reached the serving ledger"
            await asyncio.sleep(0.01)
        assert await led.authenticate(other) == other_key  # only that key was dropped
    finally:
        await led.close()


async def test_a_key_created_by_another_process_works_immediately(db_path: str) -> None:
    led = await Ledger.open(db_path, refresh_ms=60_000)  # no refresh during this test
    try:
        acct = await led.create_account("alice")
        store = await Store.open(db_path, create=False)
        key, plaintext = await store.create_key(acct.id)
        await store.close()
        assert await led.authenticate(plaintext) == key  # a cache miss reads the database
    finally:
        await led.close()


async def test_custom_prefix(db_path: str) -> None:
    led = await Ledger.open(db_path, key_prefix="tg_")
    try:
        acct = await led.create_account("alice")
        key, plaintext = await led.create_key(acct.id)
        assert plaintext.startswith("tg_")
        assert await led.authenticate(plaintext) == key
    finally:
        await led.close()
