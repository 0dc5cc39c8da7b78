"""The ledger on PostgreSQL, for one of many serving workers: :class:`Ledger`'s twin.

:meth:`teegate.ledger.Ledger.open` returns a :class:`PgLedger` for a
``postgresql://`` URL; it has the same request-path methods (``authenticate``,
``reserve``, ``settle``, ``release``, ``flush``, ``close``, ...) and keeps the
same promises (see :mod:`teegate.ledger.ledger`), across any number of
processes and machines on one database:

1. **A reservation is committed before the request may go upstream**, batched
   per worker (:mod:`teegate.ledger.pgwriter`). The balance check is the
   database's conditional ``UPDATE`` (:mod:`teegate.ledger.pgschema`), never this
   process's memory, so workers cannot together overspend an account.
2. **Settlements are idempotent in the database**: a second settlement or
   release of a reservation is skipped there, whoever wrote the first.
3. **Crash rule across workers.** Each worker takes a worker id (the caller's,
   or the next of the ``worker_ids`` sequence) and holds
   ``pg_advisory_lock(LOCK_SPACE, worker_id)`` on its writing connection for its
   life; its reservations carry that id. The server drops the lock with the
   connection, also when the process is killed. A sweeper (at start, then every
   ``sweep_interval_s``) charges in full the open reservations of every worker
   whose lock it can take, exactly as SQLite's start-up recovery does.
   A worker restarted with the same explicit id first charges what its previous
   life left open.
4. **Shared rate limits**: ``reserve(..., rate_limit=n)`` counts the request in
   the key's one-minute window in the same statement, before the balance check
   (:class:`~teegate.ledger.errors.RateLimited` comes before
   :class:`~teegate.ledger.errors.InsufficientBalance`).
5. **Revocations reach every worker within ``key_poll_ms``** (200 ms by
   default): a trigger bumps ``ledger_meta.key_version`` at every revocation,
   and each worker polls it and drops its key cache when it changes (and
   whenever the poll fails). Top-ups need nothing: every reservation reads
   the balance in the database.

What both stores do alike (authentication, operator writes, settle, release,
receipts, reports) is :class:`teegate.ledger.serving.ServingLedger`; this module
keeps the worker's own: its id and lock, the reservation round trip, the key poll
and the sweeper. The SQL lives in :mod:`teegate.ledger.pgschema` and
:mod:`teegate.ledger.pgstore`, the group commit in :mod:`teegate.ledger.pgwriter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import structlog

from teegate.ledger.errors import (
    InsufficientBalance,
    LedgerError,
    LedgerLocked,
    LedgerUnavailable,
    RateLimited,
    UnknownAccount,
)
from teegate.ledger.keycache import KeyCache
from teegate.ledger.keys import DEFAULT_PREFIX, check_prefix
from teegate.ledger.models import ApiKey, Recovered, Reservation
from teegate.ledger.operator import now_ms
from teegate.ledger.ops import Finalization, NewReservation
from teegate.ledger.pgschema import LOCK_SPACE, redact
from teegate.ledger.pgstore import PgStore, connect
from teegate.ledger.pgwriter import PgCommitter, Row, final_row, reservation_row
from teegate.ledger.serving import ServingLedger, log_recovered

log = structlog.get_logger("teegate.ledger")

_RECOVERED_RULE = "open and its worker gone: charged the full reserved amount"


class PgLedger(ServingLedger):
    """Prepaid balances for one worker's request path on PostgreSQL. Create with :meth:`open`."""

    shared_rate_limits = True  # reserve() counts the key's requests in the database

    def __init__(
        self,
        url: str,
        admin: PgStore,
        worker_id: int,
        *,
        key_prefix: str,
        batch_max: int,
        settle_linger_ms: float,
        key_poll_ms: float,
        sweep_interval_s: float,
    ) -> None:
        self._url = url
        self.path = redact(url)
        self.worker_id = worker_id
        self._admin = self._reads = self._writes = admin
        self._writer_conn: Any = None
        self._prefix = key_prefix
        self._keys = KeyCache()
        self._key_version = -1
        self._key_poll_s = key_poll_ms / 1000
        self._sweep_s = sweep_interval_s
        self._open = {}
        self._writer = PgCommitter(
            self._apply,
            self._finalised,
            self._observe,
            batch_max=batch_max,
            settle_linger_ms=settle_linger_ms,
        )
        self._seen: dict[int, int] = {}  # balances as of this worker's last commit
        self._tasks = []
        self._closed = False
        self.recovered = []

    # -- life cycle -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        key_prefix: str = DEFAULT_PREFIX,
        batch_max: int = 256,
        settle_linger_ms: float = 50.0,
        key_poll_ms: float = 200.0,
        sweep_interval_s: float = 10.0,
        worker_id: int | None = None,
        recover: bool = True,
        **_: object,
    ) -> PgLedger:
        """Connect, migrate, take a worker id and its lock, sweep, then serve.

        ``worker_id``: an explicit id (unique across every machine on this
        database; :class:`LedgerLocked` if a live worker holds it), or None for
        the next id of the database's ``worker_ids`` sequence.
        """
        check_prefix(key_prefix)
        if key_poll_ms <= 0 or sweep_interval_s <= 0:
            raise ValueError("key_poll_ms and sweep_interval_s must be positive")
        if worker_id is not None and (isinstance(worker_id, bool) or worker_id < 1):
            raise ValueError("worker_id must be a positive integer")
        admin = await PgStore.open(url)
        ledger: PgLedger | None = None
        try:
            if worker_id is None:
                (worker_id,) = await admin._one("SELECT nextval('worker_ids')")
            assert worker_id is not None
            ledger = cls(
                url,
                admin,
                int(worker_id),
                key_prefix=key_prefix,
                batch_max=batch_max,
                settle_linger_ms=settle_linger_ms,
                key_poll_ms=key_poll_ms,
                sweep_interval_s=sweep_interval_s,
            )
            await ledger._connect_writer()
            await ledger._start(recover)
        except BaseException:
            if ledger is not None and ledger._writer_conn is not None:
                await ledger._writer_conn.close()
            await admin.close()
            raise
        return ledger

    async def _connect_writer(self) -> Any:
        """The writing connection, holding this worker's advisory lock (reconnects if lost)."""
        conn = self._writer_conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
            self._writer_conn = None
            log.error("ledger.writer_reconnect", worker_id=self.worker_id)
        conn = await connect(self._url)
        cur = await conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_SPACE, self.worker_id)
        )
        row = await cur.fetchone()
        if not row or not row[0]:
            await conn.close()
            raise LedgerLocked(
                f"ledger worker id {self.worker_id} is held by a live worker on {self.path}"
            )
        self._writer_conn = conn
        return conn

    async def _start(self, recover: bool) -> None:
        # Ours from a previous life (same explicit id): our lock makes them unsweepable otherwise.
        own = await self._admin._charge_open(self.worker_id, [])
        self.recovered = own
        if recover:
            self.recovered += await self._admin.recover(own_worker=self.worker_id)
        log_recovered(self.recovered, _RECOVERED_RULE)
        self._key_version = await self._admin.key_version()
        self._seen = await self._admin.balances()
        self._writer.start()
        self._tasks = [
            self._every(self._key_poll_s, self.refresh, "ledger.refresh_failed", "ledger-key-poll"),
            self._every(self._sweep_s, self.recover, "ledger.sweep_failed", "ledger-sweeper"),
        ]

    async def _release_connections(self) -> None:
        if self._writer_conn is not None:
            await self._writer_conn.close()
        await self._admin.close()

    # -- dialect hooks (see teegate.ledger.serving) -----------------------------

    def _committed_balance(self, account_id: int, balance_micro: int) -> None:
        self._seen[account_id] = balance_micro  # informational (see available_micro)

    def _queue_final(self, op: Finalization, hold: int) -> None:
        self._writer.submit(final_row(op), wait=False)  # nothing is held in memory here

    async def writable(self) -> bool:
        """Whether a write could commit now (readiness probes, not the request path).

        Open, group commits not failing, the writing connection up with this worker's
        lock, and the server a primary: a standby (``pg_is_in_recovery``) answers reads
        but can commit nothing.
        """
        if self._closed or self._writer.failures:
            return False
        try:
            conn = await self._connect_writer()
            cur = await conn.execute("SELECT pg_is_in_recovery()")
            row = await cur.fetchone()
        except Exception:
            return False
        return bool(row) and not row[0]

    def available_micro(self, account_id: int) -> int | None:
        """The balance as of this worker's last commit touching the account (None: never seen).

        Informational only: other workers may have spent or topped up since,
        and no decision here depends on it (the database checks every reservation).
        """
        return self._seen.get(account_id)

    def _observe(self, op: dict[str, Any], row: Row) -> None:
        if row[3] is not None:
            self._seen[int(op["account_id"])] = int(row[3])

    async def count_request(self, key: ApiKey) -> tuple[int, int]:
        """Count a request that reserves nothing in the key's shared one-minute window.

        Returns ``(count including this one, window start in ms)``; the caller
        compares it with the key's limit. (Chat completions are counted by
        :meth:`reserve` instead, in the reservation's own round trip.)
        """
        try:  # the writing connection: never inside a transaction of the admin connection's
            conn = await self._connect_writer()
        except LedgerError as e:
            raise LedgerUnavailable(str(e)) from None
        cur = await conn.execute(
            "SELECT started_ms, count FROM teegate_count(%s)", (key.key_id,)
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[1]), int(row[0])

    # -- the request path -------------------------------------------------------

    async def _reserve(self, op: NewReservation, rate_limit: int | None) -> Reservation:
        """One round trip: rate window, balance check and hold, all in ``teegate_apply``."""
        if rate_limit is not None:
            rate_limit = int(rate_limit)
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        future = self._writer.submit(reservation_row(op, rate_limit), wait=True)
        assert future is not None
        try:
            row: Row = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(
                lambda f: self._release_abandoned(f, op, rate_limit)  # the hold may still commit
            )
            raise
        return self._outcome(row, op, rate_limit)

    def _outcome(self, row: Row, op: NewReservation, rate_limit: int | None) -> Reservation:
        _, outcome, entry_id, balance, count, started = row
        if outcome == "rate_limited":
            raise RateLimited(rate_limit or 0, int(count), int(started))
        if outcome == "insufficient":
            error = InsufficientBalance(int(balance), op.amount_micro)
            if count is not None:
                error.rate_window = (int(count), int(started))  # type: ignore[attr-defined]
            raise error
        if outcome == "unknown_account":
            raise UnknownAccount(f"no account {op.account_id}")
        if outcome != "ok":
            raise LedgerUnavailable(f"unexpected reservation outcome {outcome!r}")
        res = self._registered(op, int(entry_id))
        if count is not None:
            res.rate_window = (int(count), int(started))
        return res

    def _release_abandoned(
        self, future: asyncio.Future[Any], op: NewReservation, rate_limit: int | None
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        with contextlib.suppress(LedgerError):
            self._release_cancelled(self._outcome(future.result(), op, rate_limit))

    def _finalised(self, op: dict[str, Any], row: Row | None, error: Exception | None) -> None:
        """The writer's report on a settlement or release (nobody awaits those)."""
        if row is None:
            log.error(
                "ledger.finalization_lost",
                reservation_id=op["reservation_id"],
                account_id=op["account_id"],
                kind=op["kind"],
                error=type(error).__name__ if error else "no result",
                consequence="the reservation stays open; the sweeper charges it in full",
            )
        elif row[1] == "duplicate":
            log.warning(
                "ledger.finalization_duplicate",
                reservation_id=op["reservation_id"],
                kind=op["kind"],
                consequence="already finalised (by the sweeper or a retried commit); dropped",
            )
        elif row[5]:  # unrecovered
            log.warning(
                "ledger.charge_above_reservation",
                reservation_id=op["reservation_id"],
                request_id=op["request_id"],
                model=op["model"],
                account_id=op["account_id"],
                price_micro=op["charge"],
                charged_micro=int(row[4]),
                unrecovered_micro=int(row[5]),
                rule="charged up to the account's balance; the rest is recorded as unrecovered",
            )

    async def _apply(self, ops: list[dict[str, Any]]) -> list[Row]:
        try:
            conn = await self._connect_writer()
        except LedgerError as e:
            raise LedgerUnavailable(str(e)) from None
        cur = await conn.execute(
            "SELECT * FROM teegate_apply(%s::jsonb, %s, %s)",
            (json.dumps(ops, separators=(",", ":")), self.worker_id, now_ms()),
        )
        return list(await cur.fetchall())

    # -- checks and background work ---------------------------------------------

    async def recover(self) -> list[Recovered]:
        """Charge in full the open reservations of dead workers (never this one's)."""
        await self.flush()
        recovered = await self._admin.recover(own_worker=self.worker_id)
        log_recovered(recovered, _RECOVERED_RULE)
        self.recovered.extend(recovered)
        return recovered

    sweep = recover

    async def refresh(self) -> bool:
        """Drop the key cache if a key was revoked anywhere; True if one was."""
        try:
            version = await self._admin.key_version()
        except Exception:
            self._keys.clear()  # cannot tell: trust no cached key
            raise
        if version == self._key_version:
            return False
        self._keys.clear()
        self._key_version = version
        return True

