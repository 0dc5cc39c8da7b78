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
   life left open. A live worker whose writing connection died (a database
   restart, a failover, a terminated session) lost its lock with it, so a
   sweeper may already be charging its reservations: it never takes that id
   again, but a new one, and adopts the reservations it still knows open that
   no sweeper took (:meth:`PgLedger._connect_writer`). A settlement of one a
   sweeper took is dropped as a duplicate: the full hold stands, charged once.
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

Why this module is long: the worker's own part is one class whose methods share the
writing connection (and its lock), the map of open reservations and the reservations in
doubt: taking the lock, re-locking under a new id after a lost connection (adopting what
it knows open, releasing what committed in doubt), the reservation round trip, and the
background key poll, idle-writer check and sweep that keep that connection honest. What
both stores share is already :class:`~teegate.ledger.serving.ServingLedger`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import structlog

from teegate.ledger.billing import Prices
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
from teegate.ledger.pgdeadline import bounded, request_path_settings
from teegate.ledger.pgschema import LOCK_SPACE, redact
from teegate.ledger.pgstore import Backoff, PgStore, connect
from teegate.ledger.pgwriter import PgCommitter, Row, final_row, reservation_row
from teegate.ledger.serving import ServingLedger, log_recovered

log = structlog.get_logger("teegate.ledger")

_RECOVERED_RULE = "open and its worker gone: charged the full reserved amount"
MAX_IN_DOUBT = 10_000  # failed reservations remembered until the writing connection is back


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
        statement_timeout_ms: float | None = None,
    ) -> None:
        self._url = url
        # Every request-path statement's bound (see teegate.ledger.pgdeadline.bounded).
        self._deadline_s = None if statement_timeout_ms is None else statement_timeout_ms / 1000
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
            on_doubt=self._doubt,
        )
        # Reservations whose commit failed on a connection error: committed or not, nobody can
        # tell until the writing connection is back (their requests were refused either way).
        self._in_doubt: dict[str, dict[str, Any]] = {}
        self._seen: dict[int, int] = {}  # balances as of this worker's last commit
        self._tasks = []
        self._closed = False
        self._connecting = asyncio.Lock()
        self._backoff = Backoff()
        self._lock_lost = False  # the writing connection died: the next one takes a new id
        self._writer_pid: int | None = None  # its server process, ended before re-locking
        self._commits_seen = -1  # group commits as of the last check_writer
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
        statement_timeout_ms: float | None = 5000.0,
        worker_id: int | None = None,
        recover: bool = True,
        **_: object,
    ) -> PgLedger:
        """Connect, migrate, take a worker id and its lock, sweep, then serve.

        ``worker_id``: an explicit id (unique across every machine on this
        database; :class:`LedgerLocked` if a live worker holds it), or None for
        the next id of the database's ``worker_ids`` sequence.
        ``statement_timeout_ms``: a request-path statement (key lookup, group commit, rate
        count) with no answer by then fails closed (:class:`LedgerUnavailable`) and its
        connection is replaced; None: no bound but the keepalives'.
        """
        check_prefix(key_prefix)
        if key_poll_ms <= 0 or sweep_interval_s <= 0:
            raise ValueError("key_poll_ms and sweep_interval_s must be positive")
        if worker_id is not None and (isinstance(worker_id, bool) or worker_id < 1):
            raise ValueError("worker_id must be a positive integer")
        if statement_timeout_ms is not None and statement_timeout_ms <= 0:
            raise ValueError("statement_timeout_ms must be positive")
        deadline_s = None if statement_timeout_ms is None else statement_timeout_ms / 1000
        admin = await PgStore.open(url, deadline_s=deadline_s)
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
                statement_timeout_ms=statement_timeout_ms,
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
        """The writing connection, holding this worker's advisory lock (reconnects if lost).

        A lost connection took the lock with it, and with the lock the promise that nobody
        sweeps this worker's reservations: another worker's sweeper may be charging them in
        full right now. So the new connection never takes the old id again; it takes a new one
        from the sequence, then adopts (moves to the new id) the reservations this worker still
        knows open or is settling, unless a sweeper charged them first, and releases those
        whose commit was in doubt when the connection died but did happen (their requests
        were refused). Whatever else stays under the old id, whose lock is now free for good,
        is charged in full by the next sweep: never lost, never doubled.
        """
        conn = self._writer_conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        async with self._connecting:  # one reconnect, whoever noticed first
            conn = self._writer_conn
            if conn is not None and not conn.closed and not conn.broken:
                return conn
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
                self._writer_conn = None
                self._lock_lost = True
                log.error("ledger.writer_lost", worker_id=self.worker_id)
            self._backoff.check(self.path)
            try:
                conn = await connect(
                    self._url,
                    timeout_s=self._deadline_s,
                    session=request_path_settings(self._deadline_s, statements=True),
                )
            except LedgerUnavailable:
                self._backoff.failed()
                raise
            self._backoff.succeeded()
            try:
                if self._lock_lost:
                    ids = set(self._open) | self._writer.queued_final_ids()
                    await self._bound(conn, self._relock(conn, ids), "re-locking")
                elif not await self._bound(conn, _try_lock(conn, self.worker_id), "locking"):
                    raise LedgerLocked(
                        f"ledger worker id {self.worker_id} is held by a live worker on "
                        f"{self.path}"
                    )
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.close()
                raise
            self._writer_conn = conn
            self._writer_pid = conn.info.backend_pid
            return conn

    async def _relock(self, conn: Any, known: set[int]) -> None:
        """Take a new worker id on ``conn`` and adopt the ``known`` reservations still open."""
        for _ in range(8):  # an explicit id of a live worker may be next in the sequence
            cur = await conn.execute("SELECT nextval('worker_ids')")
            row = await cur.fetchone()
            assert row is not None
            new = int(row[0])
            if await _try_lock(conn, new):
                break
        else:
            raise LedgerLocked(f"no free worker id in the sequence of {self.path}")
        old = self.worker_id
        await self._end_old_session(conn, old)
        cur = await conn.execute(  # ours, under whichever id an earlier attempt left them
            "UPDATE usage SET worker_id = %s WHERE state = 'open' "
            "AND reservation_id = ANY(%s) RETURNING reservation_id",
            (new, sorted(known)),
        )
        adopted = len(await cur.fetchall())
        released = await self._release_in_doubt(conn, new)
        self.worker_id = new
        self._lock_lost = False
        log.warning(
            "ledger.worker_relocked",
            old_worker_id=old,
            worker_id=new,
            adopted=adopted,
            swept=len(known) - adopted,
            released_in_doubt=released,
            consequence="reservations not adopted were charged in full by a sweeper; "
            "their settlements are dropped as duplicates",
        )

    async def _end_old_session(self, conn: Any, old: int) -> None:
        """End the lost connection's server session if it still lives (a partition, or a
        deadline that severed a silent connection): until it ends, a statement of ours still
        on its way to it (a reservation in doubt) could commit after :meth:`_release_in_doubt`
        looked for it and stay open under the old id, to be charged in full by a sweep for a
        request that was refused. Only that process, and only while it holds the old id's
        lock (a process id can be reused by another session after a restart)."""
        pid = self._writer_pid
        if pid is None:
            return
        wait_ms = max(1, round((self._deadline_s or 5.0) * 500))  # half the deadline
        cur = await conn.execute(
            "SELECT pg_terminate_backend(pid, %s) FROM pg_locks WHERE locktype = 'advisory' "
            "AND classid = %s AND objid = %s AND objsubid = 2 AND granted AND pid = %s",
            (wait_ms, LOCK_SPACE, old, pid),
        )
        for (ended,) in await cur.fetchall():
            log.warning("ledger.old_session_ended", worker_id=old, ended=bool(ended))
        self._writer_pid = None  # ended or gone (a failed attempt tries again next time)

    def _doubt(self, op: dict[str, Any]) -> None:
        self._in_doubt[op["request_id"]] = op
        while len(self._in_doubt) > MAX_IN_DOUBT:
            self._in_doubt.pop(next(iter(self._in_doubt)))

    async def _release_in_doubt(self, conn: Any, new: int) -> int:
        """Adopt and release the reservations that did commit although their callers were told
        they had not (their requests were refused, never sent): not charged, not left open.
        (Request ids are this process's own random ones: no other worker's row matches.)"""
        if not self._in_doubt:
            return 0
        cur = await conn.execute(
            "UPDATE usage SET worker_id = %s WHERE state = 'open' "
            "AND request_id = ANY(%s) AND NOT (reservation_id = ANY(%s)) "
            "RETURNING reservation_id, request_id, account_id, key_id, model, reserved_micro",
            (new, sorted(self._in_doubt), sorted(self._open)),
        )
        rows = await cur.fetchall()
        doubts, self._in_doubt = self._in_doubt, {}  # found or never committed: settled now
        for rid, request_id, account_id, key_id, model, amount in rows:
            op = doubts[request_id]
            res = Reservation(
                id=int(rid),
                request_id=request_id,
                account_id=int(account_id),
                key_id=int(key_id),
                model=model,
                prices=Prices(op["price_input"], op["price_output"], op["price_cache_read"]),
                amount_micro=int(amount),
                created_ms=int(op["created_ms"]),
            )
            with contextlib.suppress(LedgerUnavailable):  # closing: the sweep charges it
                self._finalize_release(res, "commit in doubt; not sent", None)
        return len(rows)

    async def check_writer(self) -> None:
        """Use the writing connection once, so a lost one (and lock) is replaced now, while
        idle, rather than by the next reservation (which would fail closed on it)."""
        if self._closed:
            return
        conn = await self._connect_writer()
        try:
            await self._bound(conn, conn.execute("SELECT 1"), "writer check")
        except psycopg.OperationalError:
            if not conn.broken:
                raise
            await self._connect_writer()

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
        self._tasks = [  # not ServingLedger._every: these log a failure once per outage
            asyncio.create_task(self._key_poll_loop(), name="ledger-key-poll"),
            asyncio.create_task(self._sweep_loop(), name="ledger-sweeper"),
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
            cur = await self._bound(conn, conn.execute("SELECT pg_is_in_recovery()"), "probe")
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
        try:
            cur = await self._bound(
                conn,
                conn.execute("SELECT started_ms, count FROM teegate_count(%s)", (key.key_id,)),
                "rate count",
            )
            row = await cur.fetchone()
        except psycopg.OperationalError as e:  # the connection died: replaced at next use
            raise LedgerUnavailable(f"could not count the request: {type(e).__name__}") from e
        assert row is not None
        return int(row[1]), int(row[0])

    # -- the request path -------------------------------------------------------

    async def _reserve(self, op: NewReservation, rate_limit: int | None) -> Reservation:
        """One round trip: rate window, balance check and hold, all in ``teegate_apply``."""
        if rate_limit is not None:
            rate_limit = int(rate_limit)
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        future = self._writer.submit(
            reservation_row(op, rate_limit),
            wait=True,
            abandoned=lambda row: self._release_row(row, op, rate_limit),
        )
        assert future is not None
        # Awaited directly (no asyncio.shield: each future between the commit and this task
        # costs one more turn of a busy event loop). The deadline also bounds the wait in the
        # queue: behind a group commit that is itself waiting out the deadline, or the
        # writer's back-off after one failed. Giving up cancels the future; the writer then
        # releases the reservation if it commits all the same (``abandoned``).
        try:
            async with asyncio.timeout(self._deadline_s):
                row: Row = await future
        except (asyncio.CancelledError, TimeoutError) as e:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release_row(future.result(), op, rate_limit)  # landed as we gave up
            if isinstance(e, TimeoutError):
                raise LedgerUnavailable(
                    f"{self.path}: the reservation was not committed within the deadline"
                ) from None
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

    def _release_row(self, row: Row, op: NewReservation, rate_limit: int | None) -> None:
        """A committed reservation whose request gave up waiting for it: released."""
        with contextlib.suppress(LedgerError):
            self._release_cancelled(self._outcome(row, op, rate_limit))

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
        cur = await self._bound(
            conn,
            conn.execute(
                "SELECT * FROM teegate_apply(%s::jsonb, %s, %s)",
                (json.dumps(ops, separators=(",", ":")), self.worker_id, now_ms()),
            ),
            "group commit",
        )
        return list(await cur.fetchall())

    def _bound[T](self, conn: Any, aw: Awaitable[T], what: str) -> Awaitable[T]:
        """``aw`` on the writing connection ``conn``, within the request path's deadline."""
        return bounded(conn, aw, self._deadline_s, f"{self.path}: {what}")

    # -- checks and background work ---------------------------------------------

    async def recover(self) -> list[Recovered]:
        """Charge in full the open reservations of dead workers (never this one's)."""
        await self.flush()
        mine = set(self._open) | self._writer.queued_final_ids()  # also under a lost old id
        recovered = await self._admin.recover(mine, own_worker=self.worker_id)
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

    async def _key_poll_loop(self) -> None:
        steps = (("refresh", self.refresh), ("writer_check", self._check_idle_writer))
        failing: set[str] = set()
        while True:
            await asyncio.sleep(self._key_poll_s)
            for name, step in steps:
                await _logged_once(name, step, failing)

    async def _check_idle_writer(self) -> None:
        if self._writer.commits != self._commits_seen:  # it committed since: alive, no ping
            self._commits_seen = self._writer.commits
            return
        await self.check_writer()

    async def _sweep_loop(self) -> None:
        failing: set[str] = set()
        while True:
            await asyncio.sleep(self._sweep_s)
            await _logged_once("sweep", self.recover, failing)


async def _logged_once(
    name: str, step: Callable[[], Awaitable[object]], failing: set[str]
) -> None:
    """Run a background step; log its failure once per outage (it runs every 200 ms), and
    when it works again."""
    try:
        await step()
    except Exception as e:
        if name not in failing:
            log.error(f"ledger.{name}_failed", error=type(e).__name__, logged="once per outage")
            failing.add(name)
        return
    if name in failing:
        failing.discard(name)
        log.warning(f"ledger.{name}_recovered")


async def _try_lock(conn: Any, worker_id: int) -> bool:
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_SPACE, worker_id))
    row = await cur.fetchone()
    return bool(row and row[0])
