"""Run a plain function on an aiosqlite connection's own thread, in one hand-off.

Why: every ``await db.execute(...)`` is a round trip to aiosqlite's worker
thread and back through the event loop (tens of microseconds of CPU each), and a
write batch is several statements; running the whole transaction as one function
on the thread makes it one hand-off (bench/ledger_cost.py, docs/bench.md). It also
means the transaction cannot be left open half-way by a cancelled ``await``: once
queued, the function runs to its end.

aiosqlite has no public "run this on the connection's thread" call. Its
``Connection._execute(fn, *args)`` (long-standing; as used here in the
installed 0.22.1) queues ``fn`` for that thread; ``Connection._conn`` is the
underlying :class:`sqlite3.Connection`, which was created on, and may only be
used from, that thread. This module is the one place that touches either;
pyproject.toml pins aiosqlite below the next minor release so that a change
to them shows up as a deliberate upgrade, and tests/ledger/test_dbthread.py
fails if they move.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import aiosqlite


async def run_on_connection[T](
    db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]
) -> T:
    """``fn(conn)`` on ``db``'s thread, queued behind (and before) its other calls.

    ``fn`` must not touch the event loop; exceptions it raises propagate here.
    """
    conn = db._conn  # raises ValueError if the connection is closed
    return await db._execute(fn, conn)


def transaction[T](conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn(conn)`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back if it raises.

    For use *on* the connection's thread (inside :func:`run_on_connection`);
    the connection must be in autocommit mode (``isolation_level=None``), as
    :class:`~ledger.store.Store` opens it, so that these statements are the
    only transaction control.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result
