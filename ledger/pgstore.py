"""The ledger's store on PostgreSQL: :class:`Store`'s dialect twin.

:class:`PgStore` runs the operator writes (:class:`teegate.ledger.operator.OperatorStore`:
accounts, keys, idempotent top-ups, rate limits, revocations) and the reports
(:class:`teegate.ledger.reports.Reports`: verify, usage; admin tokens and receipts through
the portable :meth:`Reports.fetch`) that SQLite runs, over one autocommit psycopg
connection; their ``?`` placeholders are turned into psycopg's ``%s`` here.
:meth:`teegate.ledger.store.Store.open` returns one for a ``postgresql://`` URL, so every
operator command works on both stores.

Recovery differs from SQLite's on purpose: many workers serve from one
database, so :meth:`recover` only charges the open reservations of workers
whose advisory lock it can take (dead ones), never a live worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors
import structlog

from teegate.ledger.errors import LedgerNotFound, LedgerUnavailable
from teegate.ledger.models import Recovered
from teegate.ledger.operator import OperatorStore, now_ms
from teegate.ledger.pgdeadline import bounded, request_path_settings
from teegate.ledger.pgschema import LOCK_SPACE, migrate, redact

log = structlog.get_logger("teegate.ledger")

# Charge every open reservation of one (dead) worker in full; balances do not move.
_CHARGE_OPEN = """
    WITH open AS (
        SELECT reservation_id, account_id FROM usage
        WHERE state = 'open' AND worker_id IS NOT DISTINCT FROM %s
          AND NOT (reservation_id = ANY(%s))
        FOR UPDATE
    ), ins AS (
        INSERT INTO entries (account_id, kind, amount_micro, reservation_id, created_ms, note)
        SELECT account_id, 'settlement', 0, reservation_id, %s, 'recovered' FROM open
        ON CONFLICT DO NOTHING
        RETURNING reservation_id
    )
    UPDATE usage u SET state = 'settled', charge_micro = u.reserved_micro,
        source = 'recovered', status = 'recovered', finalized_ms = %s
    FROM ins WHERE u.reservation_id = ins.reservation_id
    RETURNING u.reservation_id, u.request_id, u.account_id, u.key_id, u.model,
              u.reserved_micro, u.created_ms
"""


# Dead-peer bounds for every connection the ledger opens, unless the URL sets its own
# (libpq names; the server-side twins below take the same numbers). A worker's advisory lock
# lives as long as the server believes its connection alive: a machine that vanishes (power,
# network) sends no FIN, so without keepalives the server keeps the lock, and the dead worker's
# reservations unswept, for the kernel's default of ~2 hours. With these, idle connections are
# probed after 10 s and given up after 3 unanswered probes 5 s apart, and unacknowledged data
# is given up after 30 s: a dead peer's lock is free within ~30 s, its reservations charged at
# the next sweep. (Ignored on Unix sockets, where a dead peer cannot exist.)
CONNECT_DEFAULTS: dict[str, str] = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
# libpq's keepalives are the client's socket; these make the server probe its side too, which
# is what frees a vanished gateway's advisory lock (PostgreSQL settings any session may set).
_SERVER_SIDE = {
    "tcp_keepalives_idle": "keepalives_idle",
    "tcp_keepalives_interval": "keepalives_interval",
    "tcp_keepalives_count": "keepalives_count",
    "tcp_user_timeout": "tcp_user_timeout",
}


def connect_params(url: str) -> dict[str, str]:
    """libpq parameters added to ``url``: :data:`CONNECT_DEFAULTS` less what it sets itself."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    return {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}


def server_settings(url: str) -> dict[str, str]:
    """The server side's keepalive settings for a connection to ``url`` (same numbers)."""
    effective = {**CONNECT_DEFAULTS, **psycopg.conninfo.conninfo_to_dict(url)}
    if effective.get("keepalives") == "0":
        return {}
    return {server: str(effective[client]) for server, client in _SERVER_SIDE.items()}


class Backoff:
    """Bounded back-off between reconnection attempts: while the server is down, requests
    fail closed at once instead of each waiting out a connection attempt (up to
    ``connect_timeout`` against a silent host), and the server is retried every 0.1 s,
    doubling to at most every 2 s, until it answers."""

    FIRST_S = 0.1
    MAX_S = 2.0

    def __init__(self) -> None:
        self._delay = 0.0
        self._next = 0.0

    def check(self, what: str) -> None:
        """Raise :class:`LedgerUnavailable` if the last attempt failed too recently."""
        if time.monotonic() < self._next:
            raise LedgerUnavailable(f"{what}: reconnecting (next attempt within {self._delay} s)")

    def failed(self) -> None:
        self._delay = min(self.MAX_S, max(self.FIRST_S, self._delay * 2))
        self._next = time.monotonic() + self._delay

    def succeeded(self) -> None:
        self._delay = self._next = 0.0


async def connect(
    url: str, *, timeout_s: float | None = None, session: dict[str, str] | None = None
) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection with dead-peer bounds on both ends (:data:`CONNECT_DEFAULTS`).

    ``timeout_s``: the whole attempt (connection and settings) fails after this long (the
    request path's deadline: libpq's ``connect_timeout`` counts whole seconds, at least 2).
    ``session``: more server settings for this connection (:func:`request_path_settings`).
    """
    try:
        if timeout_s is None:
            return await _connect(url, session)
        return await asyncio.wait_for(_connect(url, session), timeout_s)
    except psycopg.OperationalError as e:
        raise LedgerUnavailable(f"cannot connect to {redact(url)}: {e}") from None
    except TimeoutError:
        raise LedgerUnavailable(
            f"cannot connect to {redact(url)}: no answer within {timeout_s} s"
        ) from None


async def _connect(url: str, session: dict[str, str] | None) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, **connect_params(url))
    try:
        settings = {**server_settings(url), **(session or {})}
        if settings:
            names = list(settings)
            await conn.execute(
                "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in names),
                [x for n in names for x in (n, settings[n])],
            )
    except BaseException:  # also a deadline's cancellation: never leave it half set up
        await conn.close()
        raise
    return conn


class PgStore(OperatorStore):
    """PostgreSQL: connection, transactions and the sweep (the rest: :class:`OperatorStore`)."""

    _RACE_ERRORS = (psycopg.errors.UniqueViolation,)
    _USAGE_DAY = "to_char(to_timestamp(u.created_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def __init__(self, db: Any, url: str, *, deadline_s: float | None = None) -> None:
        super().__init__(db, redact(url))
        self._url = url
        self._txn = asyncio.Lock()  # manual BEGIN/COMMIT on a connection tasks share
        self._backoff = Backoff()
        self._closed = False
        # The request path's bound on each statement (None: the CLI's, unbounded); lifted
        # inside a DEFERRED transaction (a report: it may rightly take longer).
        self.deadline_s = deadline_s
        self._unbounded = False

    def _bound[T](self, aw: Awaitable[T], what: str) -> Awaitable[T]:
        deadline = None if self._unbounded else self.deadline_s
        return bounded(self.db, aw, deadline, f"{self.path}: {what}")

    async def _on_live[T](self, run: Callable[[Any], Awaitable[T]], what: str) -> T:
        """``run(connection)`` within the deadline, once more on a new connection if the
        server had dropped this one (a restart, a failover) without psycopg knowing yet."""
        try:
            return await self._bound(run(await self._live()), what)
        except psycopg.OperationalError:
            if not self.db.broken:
                raise
            return await self._bound(run(await self._live()), what)

    async def _live(self) -> Any:
        """The connection, replaced first if the server dropped it (a restart, a failover)."""
        if (self.db.closed or self.db.broken) and not self._closed:
            self._backoff.check(self.path)
            try:
                new = await connect(
                    self._url,
                    timeout_s=self.deadline_s,
                    session=request_path_settings(self.deadline_s, statements=False),
                )
            except LedgerUnavailable:
                self._backoff.failed()
                raise
            self._backoff.succeeded()
            old, self.db = self.db, new
            with contextlib.suppress(Exception):
                await old.close()
            log.warning("ledger.reconnected", database=self.path)
        return self.db

    @classmethod
    async def open(
        cls, url: str, *, create: bool = True, deadline_s: float | None = None, **_: object
    ) -> PgStore:
        """Connect and migrate. ``create=False`` refuses a database without a ledger.
        ``deadline_s``: the request path's bound on each statement (see :func:`bounded`);
        the opening itself (migrations) is not bounded."""
        conn = await connect(url, session=request_path_settings(deadline_s, statements=False))
        try:
            if not create:
                cur = await conn.execute("SELECT to_regclass('teegate_schema') IS NOT NULL")
                row = await cur.fetchone()
                if not row or not row[0]:
                    raise LedgerNotFound(f"no ledger in the database {redact(url)}")
            await migrate(conn, url)
        except BaseException:
            await conn.close()
            raise
        return cls(conn, url, deadline_s=deadline_s)

    async def close(self) -> None:
        self._closed = True
        await self.db.close()

    @asynccontextmanager
    async def transaction(self, mode: str = "IMMEDIATE") -> AsyncIterator[Any]:
        """A transaction on the shared connection; ``DEFERRED`` (reports): one read snapshot."""
        begin = (
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if mode == "DEFERRED" else "BEGIN"
        )
        async with self._txn:
            try:
                await self._on_live(lambda db: db.execute(begin), "BEGIN")
                self._unbounded = mode == "DEFERRED"
                try:
                    yield self.db
                except BaseException:
                    if not self.db.broken:  # a dead connection took the transaction with it
                        await self._bound(self.db.execute("ROLLBACK"), "ROLLBACK")
                    raise
                await self._bound(self.db.execute("COMMIT"), "COMMIT")
            except psycopg.OperationalError as e:  # the server is gone or going: a LedgerError
                raise LedgerUnavailable(f"{self.path}: {type(e).__name__}") from e
            finally:
                self._unbounded = False

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        sql, args = sql.replace("?", "%s"), tuple(params)
        try:
            if self._txn.locked():  # inside a transaction: never swap the connection
                cur = await self._bound(self.db.execute(sql, args), "statement")
            else:
                cur = await self._on_live(lambda db: db.execute(sql, args), "statement")
        except psycopg.OperationalError as e:  # the server is gone or going: a LedgerError
            raise LedgerUnavailable(f"{self.path}: {type(e).__name__}") from e
        if cur.description is None:
            return []
        return [tuple(_plain(v) for v in row) for row in await cur.fetchall()]

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """One statement per parameter tuple, in one round trip (inside :meth:`transaction`)."""
        async with self.db.cursor() as cur:
            await self._bound(
                cur.executemany(sql.replace("?", "%s"), [tuple(p) for p in params]), "statements"
            )

    # -- keys -------------------------------------------------------------------

    async def key_version(self) -> int:
        """Bumped by a trigger at every revocation (see :mod:`teegate.ledger.pgschema`)."""
        (version,) = await self._one("SELECT key_version FROM ledger_meta")
        return int(version)

    # -- recovery ---------------------------------------------------------------

    async def recover(
        self, exclude: set[int] | None = None, *, own_worker: int | None = None
    ) -> list[Recovered]:
        """Charge in full the open reservations of every worker whose lock is free.

        A worker holds ``pg_advisory_lock(LOCK_SPACE, worker_id)`` for its life,
        so a lock this connection can take belongs to a worker that is gone
        (the lock is dropped with its connection, even on SIGKILL). Rows
        without a worker (copied from SQLite by ``ledger migrate``) belong to
        no live process either. ``exclude``: reservation ids never to touch.
        """
        skip = sorted(exclude or ())
        out: list[Recovered] = []
        await self._live()
        async with self._txn:  # never inside another task's transaction on this connection
            workers = await self._rows("SELECT DISTINCT worker_id FROM usage WHERE state = 'open'")
            for (worker,) in workers:
                out += await self._sweep_worker(worker, own_worker, skip)
        return out

    async def _sweep_worker(
        self, worker: int | None, own_worker: int | None, skip: list[int]
    ) -> list[Recovered]:
        if worker is None:
            return await self._charge_open(None, skip)
        if worker == own_worker:
            return []
        (got,) = await self._one("SELECT pg_try_advisory_lock(?, ?)", (LOCK_SPACE, worker))
        if not got:
            return []  # alive
        try:
            return await self._charge_open(worker, skip)
        finally:
            await self._rows("SELECT pg_advisory_unlock(?, ?)", (LOCK_SPACE, worker))

    async def _charge_open(self, worker: int | None, skip: list[int]) -> list[Recovered]:
        at = now_ms()
        cur = await self.db.execute(_CHARGE_OPEN, (worker, skip, at, at))
        return [Recovered.from_row(row) for row in sorted(await cur.fetchall())]

def _plain(value: Any) -> Any:
    """SUM() of bigint is numeric in PostgreSQL; money stays int."""
    return int(value) if isinstance(value, decimal.Decimal) else value
