"""Crash recovery and verification.

The crash is real: a child process opens the ledger, reserves, and is killed
with SIGKILL (no close, no flush, no atexit). The parent then reopens the file.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from teegate.ledger import Ledger, Store
from tests.support import ledgerdb as db
from tests.support.ledger import PRICES, fund

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from teegate.ledger import Ledger, Prices

    async def main():
        led = await Ledger.open(sys.argv[1])
        key = await led.authenticate(os.environ["TEST_LEDGER_KEY"])
        prices = Prices(1_000_000, 2_000_000)
        held = [await led.reserve(f"crash-{i}", key, "m", prices, 7000) for i in range(3)]
        await led.settle(held[0], 1000, 1000, 0, "usage")  # 3000 micro-USD
        await led.flush()
        print("READY", " ".join(str(r.id) for r in held[1:]), flush=True)
        await asyncio.Event().wait()  # serve forever, until killed

    asyncio.run(main())
    """
)


def _start_child(db_path: str, plaintext: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TEST_LEDGER_KEY": plaintext, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, db_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def _wait_ready(child: subprocess.Popen[str], deadline_s: float = 30.0) -> list[int]:
    assert child.stdout is not None
    readable, _, _ = select.select([child.stdout], [], [], deadline_s)
    line = child.stdout.readline() if readable else ""  # a whole line, flushed at once
    if not line.startswith("READY"):
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"child did not get ready: {line!r} {err}")
    return [int(x) for x in line.split()[1:]]


async def test_reservations_open_at_a_crash_are_settled_in_full_on_reopen(db_path: str) -> None:
    led = await Ledger.open(db_path)
    f = await fund(led, "alice", 100_000)
    await led.close()

    child = _start_child(db_path, f.plaintext)
    try:
        open_ids = _wait_ready(child)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    # While nobody serves, verify sees the two open holds (not a mismatch).
    store = await Store.open(db_path, create=False)
    report = await store.verify()
    await store.close()
    assert report.ok
    assert sorted(r.reservation_id for r in report.open_reservations) == open_ids

    led = await Ledger.open(db_path)  # the kernel released the dead child's lock
    try:
        assert sorted(r.reservation_id for r in led.recovered) == open_ids
        assert all(r.charged_micro == 7000 for r in led.recovered)
        report = await led.verify()
        assert report.ok and not report.open_reservations
        # 100_000 - 3000 (settled) - 2 * 7000 (recovered at the full hold)
        assert led.available_micro(f.account_id) == 83_000
        assert await led.recover() == []  # nothing left
    finally:
        await led.close()
    rows = db.rows(
        db_path,
        "SELECT source, status, charge_micro FROM usage WHERE reservation_id IN (?, ?)",
        open_ids,
    )
    assert rows == [("recovered", "recovered", 7000)] * 2


async def test_recover_never_touches_this_processs_live_reservations(db_path: str) -> None:
    led = await Ledger.open(db_path)
    try:
        f = await fund(led, "alice", 100_000)
        live = await led.reserve("live", f.key, "m", PRICES, 5000)
        done = await led.reserve("done", f.key, "m", PRICES, 5000)
        await led.settle(done, 10, 10, 0, "usage")  # queued, not yet committed
        assert await led.recover() == []
        assert await led.settle(live, 10, 10, 0, "usage") == 30
        await led.flush()
        assert (await led.verify()).ok
    finally:
        await led.close()


async def test_verify_detects_a_tampered_cached_balance(db_path: str) -> None:
    led = await Ledger.open(db_path)
    f = await fund(led, "alice", 10_000)
    await fund(led, "bob", 500)
    res = await led.reserve("a", f.key, "m", PRICES, 1000)
    await led.settle(res, 100, 100, 0, "usage")
    await led.close()
    db.execute(
        db_path,
        "UPDATE accounts SET balance_micro = balance_micro + 1000000 WHERE id = ?",
        (f.account_id,),
    )
    store = await Store.open(db_path, create=False)
    try:
        report = await store.verify()
    finally:
        await store.close()
    assert not report.ok
    assert [(m.kind, m.account_id) for m in report.mismatches] == [("balance", f.account_id)]
    m = report.mismatches[0]
    assert m.actual - m.expected == 1_000_000
    assert m.expected == 10_000 - 300


async def test_verify_detects_a_usage_record_that_disagrees_with_its_entries(
    db_path: str,
) -> None:
    led = await Ledger.open(db_path)
    f = await fund(led, "alice", 10_000)
    res = await led.reserve("a", f.key, "m", PRICES, 1000)
    await led.settle(res, 100, 100, 0, "usage")
    await led.close()
    db.execute(db_path, "UPDATE usage SET charge_micro = 1 WHERE reservation_id = ?", (res.id,))
    store = await Store.open(db_path, create=False)
    try:
        report = await store.verify()
    finally:
        await store.close()
    assert [(m.kind, m.account_id) for m in report.mismatches] == [("usage", f.account_id)]


async def test_verify_reports_a_balance_below_zero(db_path: str, store: str) -> None:
    """No operation takes a balance below zero (usage above its reservation stops at zero), but
    a database from before that rule may hold such rows: verify names each such account."""
    led = await Ledger.open(db_path)
    f = await fund(led, "alice", 1000)
    await fund(led, "bob", 500)
    res = await led.reserve("a", f.key, "m", PRICES, 1000)  # the whole balance
    await led.close()
    # An old settlement charging 1500 on that reservation, uncapped, its records consistent.
    db.execute(
        db_path,
        "INSERT INTO entries (account_id, kind, amount_micro, reservation_id, created_ms) "
        "VALUES (?, 'settlement', -500, ?, 0)",
        (f.account_id, res.id),
    )
    db.execute(
        db_path,
        "UPDATE usage SET state = 'settled', charge_micro = 1500, source = 'usage', "
        "prompt_tokens = 0, completion_tokens = 750, cached_tokens = 0 WHERE reservation_id = ?",
        (res.id,),
    )
    kinds = [("negative_balance", f.account_id)]
    if store == "sqlite":
        db.execute(
            db_path, "UPDATE accounts SET balance_micro = -500 WHERE id = ?", (f.account_id,)
        )
    else:  # PostgreSQL's CHECK keeps the cached balance >= 0: only the entries' sum is below
        kinds.insert(0, ("balance", f.account_id))
    store_ = await Store.open(db_path, create=False)
    try:
        report = await store_.verify()
    finally:
        await store_.close()
    assert not report.ok
    assert [(m.kind, m.account_id) for m in report.mismatches] == kinds
    negative = report.mismatches[-1]
    assert (negative.expected, negative.actual) == (0, -500)
    assert "below zero" in negative.detail and "alice" in negative.detail
