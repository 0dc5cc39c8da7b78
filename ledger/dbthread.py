"""Run a plain function on an aiosqlite connection's own thread, in one hand-off.

Why: every ``await db.execute(...)`` is a round trip to aiosqlite's worker
thread and back through the event loop (tens of microseconds of CPU each), and a
write batch is several statements; running the whole transaction as one function
on the thread makes it one hand-off (bench/ledger_cost.py, docs/bench.md). It also
means the transaction cannot be left open half-way by a cancelled ``await``: once
queued, the function runs to its end.

aiosqlite has no public "run this on the connection's thread" call. Its
``Connection._tx`` queue takes ``(future, function)`` pairs for that thread, as
its own ``_execute`` puts them there (long-standing; as used here in the installed
0.22.1; ``_running`` says whether the thread still takes work);
``Connection._conn`` is the underlying :class:`sqlite3.Connection`, which was
created on, and may only be used from, that thread. This module is the one place
that touches them; pyproject.toml pins aiosqlite below the next minor release so that a change
to them shows up as a deliberate upgrade, and tests/ledger/test_dbthread.py
fails if they move.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from functools import partial

import aiosqlite


def queue_on_connection[T](
    db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]
) -> asyncio.Future[T]:
    """``fn(conn)`` put on ``db``'s queue before this returns; await the future for its result.

    Why not only :func:`run_on_connection`: a caller holding an :class:`asyncio.Lock` can queue
    its work in order under the lock and release the lock at once, instead of holding it
    until the result is back on the event loop (a turn of a busy loop, tens of ms under
    concurrent streams). What is queued runs in queue order on the one thread.
    """
    conn = db._conn  # raises ValueError if the connection is closed
    if not db._running:
        raise ValueError("Connection closed")
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    db._tx.put_nowait((future, partial(fn, conn)))  # as aiosqlite's own _execute does
    return future


async def run_on_connection[T](
    db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]
) -> T:
    """``fn(conn)`` on ``db``'s thread, queued behind (and before) its other calls.

    ``fn`` must not touch the event loop; exceptions it raises propagate here.
    """
    return await queue_on_connection(db, fn)


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
