"""The ledger on SQLite, over one aiosqlite connection.

:class:`Store` keeps no state beyond its connection: it is what the command
line uses directly (admin writes are safe alongside a running proxy, see
:mod:`teegate.ledger.ledger`) and what :class:`~teegate.ledger.ledger.Ledger`
drives for the request path, so both create accounts and keys, credit and
revoke through the same methods (:class:`~teegate.ledger.operator.OperatorStore`,
shared with PostgreSQL). Every write happens in an explicit ``BEGIN IMMEDIATE``
transaction that inserts entries and adjusts the cached balance together. The
group commit's SQL is in :mod:`teegate.ledger.batch`, the read-only reports in
:mod:`teegate.ledger.reports`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from asyncio import Future
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from teegate.ledger import dbthread
from teegate.ledger.batch import FINALIZE_USAGE, INSERT_ENTRY, Batch, usage_params
from teegate.ledger.dbthread import queue_on_connection, run_on_connection
from teegate.ledger.errors import LedgerNotFound
from teegate.ledger.models import Recovered
from teegate.ledger.operator import OperatorStore, now_ms
from teegate.ledger.ops import Finalization, NewReservation
from teegate.ledger.pgschema import is_postgres
from teegate.ledger.reports import OPEN_RESERVATIONS
from teegate.ledger.schema import configure, migrate

log = structlog.get_logger("teegate.ledger")


class Store(OperatorStore):
    """SQLite: the request path's writes and recovery (operator writes: :class:`OperatorStore`,
    reports: :class:`Reports`)."""

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        create: bool = True,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
    ) -> Store:
        """Connect, configure WAL and migrate. ``create=False`` refuses a missing file.

        A ``postgresql://`` URL opens a :class:`teegate.ledger.pgstore.PgStore`
        (the same methods) instead.
        """
        if is_postgres(path):
            from teegate.ledger.pgstore import PgStore

            return await PgStore.open(str(path), create=create)  # type: ignore[return-value]
        path = str(path)
        if not create and not _is_file(path):
            raise LedgerNotFound(f"no ledger database at {path}")
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await configure(db, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
            await migrate(db, path)
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def data_version(self) -> int:
        """Changes whenever *another* connection commits (SQLite's own counter)."""
        rows = await self._rows("PRAGMA data_version")
        return int(rows[0][0])

    def queue_write_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> Future[None]:
        """The statements in one transaction, queued now as one call on the connection's thread.

        Why one call, not :meth:`transaction` and one ``await`` per statement: each is a
        hand-off to the thread and back through the event loop, and the group commit waits
        on the transaction lock behind all of them. Under concurrent streams a turn of the
        loop is what costs: a receipt batch written that way held the lock for 60-250 ms
        while reservations queued behind it (docs/bench.md, "Session 6"). Queued, not run:
        :meth:`teegate.ledger.ledger.Ledger._write_all` queues it (after any multi-statement
        transaction open on this connection) and waits for it outside the lock.
        """

        def run(conn: sqlite3.Connection) -> None:
            for sql, params in statements:
                conn.execute(sql, params)

        return queue_on_connection(self.db, lambda conn: dbthread.transaction(conn, run))

    # -- the request path -------------------------------------------------------

    async def apply_batch(
        self,
        reservations: Sequence[NewReservation],
        finals: Sequence[Finalization],
        *,
        on_commit: Callable[[tuple[list[int], dict[int, int]]], object] | None = None,
        follow_up: FollowUp | None = None,
    ) -> tuple[list[int], dict[int, int]]:
        """Commit reservations and finalisations in one transaction.

        Returns the reservation entry ids (in order) and the cached balances
        of every touched account as of this commit (read under the write
        lock, so they include other processes' committed top-ups).

        The whole transaction runs as one call on the connection's thread
        (:mod:`teegate.ledger.dbthread`): one hand-off per batch instead of one per
        statement, which is most of the request path's ledger CPU.
        ``on_commit(result)`` is called on that thread right after COMMIT
        (for a thread-safe early notification; anything it raises is ignored,
        the result is returned either way).

        ``follow_up`` (:class:`FollowUp`): reservations that arrived while this batch was
        being committed, committed next on the same thread without a turn of the event loop
        in between (see ``ledger/writer.py``, "express").
        """
        batch = Batch(list(reservations), list(finals))

        def run(conn: sqlite3.Connection) -> tuple[list[int], dict[int, int]]:
            result = dbthread.transaction(conn, batch.apply)
            if on_commit is not None:
                with contextlib.suppress(Exception):  # committed: never report it as failed
                    on_commit(result)
            if follow_up is not None:
                with contextlib.suppress(Exception):  # this batch's result stands regardless
                    _follow_up(conn, follow_up)
            return result

        result = await run_on_connection(self.db, run)
        for s in batch.shortfalls:
            f = s.final
            log.warning(
                "ledger.charge_above_reservation",
                reservation_id=f.reservation_id,
                request_id=f.request_id,
                model=f.model,
                account_id=f.account_id,
                reserved_micro=f.charge_micro + f.delta_micro,
                price_micro=f.charge_micro,
                charged_micro=s.charged_micro,
                unrecovered_micro=s.unrecovered_micro,
                rule="charged up to the account's balance; the rest is recorded as unrecovered",
            )
        return result

    async def recover(self, exclude: set[int]) -> list[Recovered]:
        """Settle every open reservation not in ``exclude`` at its full amount.

        A reservation is committed before its request goes upstream and is the
        upper bound of what that request may cost; one that was never settled
        or released belongs to a process that died in between, so the
        documented rule charges it in full. The settlement entry's amount is 0
        (the held amount simply stays spent), so balances do not move.
        """
        recovered: list[Recovered] = []
        at = now_ms()
        async with self.transaction() as db:
            for row in await self._rows(OPEN_RESERVATIONS):
                rid, _, account_id, _, _, amount, _ = row
                if rid in exclude:
                    continue
                final = Finalization(
                    reservation_id=rid,
                    account_id=account_id,
                    kind="settlement",
                    delta_micro=0,  # the hold stays spent
                    charge_micro=amount,
                    source="recovered",
                    status="recovered",
                    timing=None,
                    finalized_ms=at,
                )
                await db.execute(
                    INSERT_ENTRY, (None, account_id, final.kind, 0, rid, at, "recovered")
                )
                await db.execute(FINALIZE_USAGE, usage_params(final))
                recovered.append(Recovered.from_row(row))
        return recovered


def _is_file(path: str) -> bool:
    return Path(path).is_file()


class FollowUp:
    """Reservations to commit on the database thread right after a batch, in batches of
    their own, and where to report each (see :meth:`Store.apply_batch`).

    ``take()`` is called on the database thread and returns the next reservations (empty:
    done); ``landed(taken, result)`` and ``failed(taken, error)`` are called there too and
    must only hand over to the event loop (``call_soon_threadsafe``). A failed follow-up
    transaction is rolled back and its reservations handed back for the ordinary path.
    """

    def __init__(
        self,
        take: Callable[[], list[Any]],
        landed: Callable[[list[Any], tuple[list[int], dict[int, int]]], object],
        failed: Callable[[list[Any], BaseException], object],
        rounds: int,
    ) -> None:
        self.take, self.landed, self.failed, self.rounds = take, landed, failed, rounds


def _follow_up(conn: sqlite3.Connection, follow: FollowUp) -> None:
    for _ in range(follow.rounds):
        taken = follow.take()
        if not taken:
            return
        batch = Batch([t.op for t in taken], [])
        try:
            result = dbthread.transaction(conn, batch.apply)
        except Exception as e:  # rolled back: the ordinary path commits (or fails) them
            follow.failed(taken, e)
            return
        follow.landed(taken, result)
