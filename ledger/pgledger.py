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

Why this module is long: like :mod:`teegate.ledger.ledger` it is one class
whose methods share the writing connection (and its lock), the map of open
reservations and the key cache, and whose request-path methods must keep the
same contract as the SQLite ledger's line by line; the SQL lives in
:mod:`teegate.ledger.pgschema` and :mod:`teegate.ledger.pgstore`, the group
commit in :mod:`teegate.ledger.pgwriter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Self

import structlog

from teegate.ledger import inputs, receipts
from teegate.ledger.admintokens import AdminTokens
from teegate.ledger.billing import Prices, charge_micro
from teegate.ledger.errors import (
    InsufficientBalance,
    LedgerError,
    LedgerLocked,
    LedgerUnavailable,
    RateLimited,
    UnknownAccount,
)
from teegate.ledger.keycache import KeyCache
from teegate.ledger.keys import DEFAULT_PREFIX, check_prefix, hash_key, plausible, same_hash
from teegate.ledger.models import (
    Account,
    ApiKey,
    Credit,
    KeyInfo,
    OpenReservation,
    Recovered,
    Reservation,
    Timing,
    UsageBucket,
    UsageGroup,
    UsageSource,
    VerifyReport,
)
from teegate.ledger.pgschema import LOCK_SPACE, redact
from teegate.ledger.pgstore import PgStore, connect
from teegate.ledger.pgwriter import PgCommitter, Row
from teegate.ledger.store import now_ms

log = structlog.get_logger("teegate.ledger")

MAX_TEXT = 200


class PgLedger:
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
        self._admin = admin
        self._writer_conn: Any = None
        self._prefix = key_prefix
        self._keys = KeyCache()
        self._key_version = -1
        self._key_poll_s = key_poll_ms / 1000
        self._sweep_s = sweep_interval_s
        self._open: dict[int, Reservation] = {}
        self._writer = PgCommitter(
            self._apply,
            self._finalised,
            self._observe,
            batch_max=batch_max,
            settle_linger_ms=settle_linger_ms,
        )
        self._seen: dict[int, int] = {}  # balances as of this worker's last commit
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.recovered: list[Recovered] = []

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
        _log_recovered(self.recovered)
        self._key_version = await self._admin.key_version()
        self._seen = await self._admin.balances()
        self._writer.start()
        self._tasks = [
            asyncio.create_task(self._key_poll_loop(), name="ledger-key-poll"),
            asyncio.create_task(self._sweep_loop(), name="ledger-sweeper"),
        ]

    async def close(self) -> None:
        """Commit everything queued, then drop the connections (and with them the lock)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._writer.stop()
        finally:
            for task in self._tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._writer_conn is not None:
                await self._writer_conn.close()
            await self._admin.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def key_prefix(self) -> str:
        return self._prefix

    async def flush(self) -> None:
        await self._writer.flush()

    # -- keys and accounts ------------------------------------------------------

    async def authenticate(self, presented: str) -> ApiKey | None:
        if not plausible(presented, self._prefix):
            return None
        digest = hash_key(presented)
        key = self._keys.get(digest)
        if key is not None:
            return key
        found = await self._admin.find_key(digest)
        if found is None:
            return None
        key, stored = found
        if not same_hash(stored, digest):  # pragma: no cover - the lookup was by equality
            return None
        self._keys.put(digest, key)
        return key

    async def create_key(
        self, account: int | str, *, label: str | None = None, rate_limit: int | None = None
    ) -> tuple[ApiKey, str]:
        acct = await self._admin.require_account(account)
        return await self._admin.create_key(
            acct.id, prefix=self._prefix, label=label, rate_limit=rate_limit
        )

    async def revoke_key(self, key_id: int) -> bool:
        changed = await self._admin.revoke_key(key_id)
        self._keys.drop_key(key_id)
        return changed

    async def create_account(self, name: str, *, topup_micro: int = 0) -> Account:
        account = await self._admin.create_account(name, topup_micro)
        self._seen[account.id] = account.balance_micro
        return account

    async def account(self, account: int | str) -> Account | None:
        return await self._admin.find_account(account)

    async def list_accounts(self) -> list[Account]:
        return await self._admin.list_accounts()

    async def list_keys(
        self, account_id: int | None = None, *, key_id: int | None = None
    ) -> list[KeyInfo]:
        return await self._admin.list_keys(account_id, key_id=key_id)

    async def open_reservations(self, account_id: int | None = None) -> list[OpenReservation]:
        """Committed holds not yet settled, of one account or all (every worker's)."""
        found = await self._admin.open_reservations()
        return [r for r in found if account_id is None or r.account_id == account_id]

    @property
    def open_count(self) -> int:
        """Reservations this worker holds open right now (requests in flight)."""
        return len(self._open)

    # -- operator writes: the same PgStore operations the command line makes ----

    async def topup(
        self,
        account: int | str,
        amount_micro: int,
        note: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Credit:
        """:meth:`PgStore.topup`: spendable at once by every worker (each reservation
        reads the balance in the database)."""
        acct = await self._admin.require_account(account)
        credit = await self._admin.topup(
            acct.id, amount_micro, note, idempotency_key=idempotency_key
        )
        self._seen[acct.id] = credit.balance_micro  # informational (see available_micro)
        return credit

    async def set_rate_limit(self, key_id: int, rate_limit: int | None) -> KeyInfo:
        """:meth:`PgStore.set_rate_limit`: at once in this worker, within ``key_poll_ms``
        in the others (the trigger bumps ``key_version``)."""
        info = await self._admin.set_rate_limit(key_id, rate_limit)
        self._keys.drop_key(key_id)
        return info

    @property
    def admin_tokens(self) -> AdminTokens:
        return AdminTokens(self._admin)

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

    # -- receipts and response signatures -----------------------------------------

    async def write_receipts(
        self,
        stored: list[receipts.StoredReceipt],
        signatures: list[tuple[int, str]],
    ) -> None:
        """Receipts and signature outcomes (reservation id, status), in one transaction.

        A signature outcome names a reservation this worker committed before its request
        went upstream, so its usage row exists (settled or not: the settlement does not
        touch ``signature``).
        """
        await receipts.write(self._admin, stored, signatures)

    async def receipt(self, receipt_id: str, key_id: int) -> str | None:
        """A stored receipt's signed JSON, only for the key that made its request."""
        return await receipts.read(self._admin, receipt_id, key_id)

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

    async def reserve(
        self,
        request_id: str,
        key: ApiKey,
        model: str,
        prices: Prices,
        amount_micro: int,
        *,
        rate_limit: int | None = None,
    ) -> Reservation:
        """Hold ``amount_micro`` of the key's account; returns once committed.

        With ``rate_limit`` the request is first counted in the key's shared
        one-minute window (:class:`RateLimited` beyond it). Then
        :class:`InsufficientBalance` if the balance in the database is lower,
        :class:`LedgerUnavailable` if the hold could not be committed.
        """
        amount = inputs.hold_amount(amount_micro)
        _check_text("request_id", request_id)
        _check_text("model", model)
        if not isinstance(prices, Prices):
            raise TypeError("prices must be a ledger.billing.Prices")
        if rate_limit is not None:
            rate_limit = int(rate_limit)
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        created = now_ms()
        op = {
            "t": "r",
            "request_id": request_id,
            "account_id": key.account_id,
            "key_id": key.key_id,
            "model": model,
            "price_input": prices.input,
            "price_output": prices.output,
            "price_cache_read": prices.cache_read,
            "amount": amount,
            "created_ms": created,
            "rate_limit": rate_limit,
        }
        future = self._writer.submit(op, wait=True)
        assert future is not None
        try:
            row: Row = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(
                lambda f: self._release_abandoned(f, op, prices)  # the hold may still commit
            )
            raise
        return self._outcome(row, op, prices, rate_limit)

    def _outcome(
        self, row: Row, op: dict[str, Any], prices: Prices, rate_limit: int | None
    ) -> Reservation:
        _, outcome, entry_id, balance, count, started = row
        if outcome == "rate_limited":
            raise RateLimited(rate_limit or 0, int(count), int(started))
        if outcome == "insufficient":
            error = InsufficientBalance(int(balance), op["amount"])
            if count is not None:
                error.rate_window = (int(count), int(started))  # type: ignore[attr-defined]
            raise error
        if outcome == "unknown_account":
            raise UnknownAccount(f"no account {op['account_id']}")
        if outcome != "ok":
            raise LedgerUnavailable(f"unexpected reservation outcome {outcome!r}")
        res = Reservation(
            id=int(entry_id),
            request_id=op["request_id"],
            account_id=op["account_id"],
            key_id=op["key_id"],
            model=op["model"],
            prices=prices,
            amount_micro=op["amount"],
            created_ms=op["created_ms"],
        )
        self._open[res.id] = res
        if count is not None:
            res.rate_window = (int(count), int(started))
        return res

    def _release_abandoned(
        self, future: asyncio.Future[Any], op: dict[str, Any], p: Prices
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        with contextlib.suppress(LedgerError):
            res = self._outcome(future.result(), op, p, op["rate_limit"])
            self._finalize_release(res, "cancelled before upstream", None)

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        source: UsageSource = "usage",
        timing: Timing | None = None,
        *,
        status: str = "ok",
    ) -> int:
        """Charge actual usage; idempotent. See :meth:`teegate.ledger.Ledger.settle`."""
        if reservation.state != "open":
            return reservation.charge_micro or 0
        self._check_own(reservation)
        if source not in ("usage", "bytes"):
            raise ValueError('source must be "usage" or "bytes"')
        _check_text("status", status)
        charge = charge_micro(reservation.prices, prompt_tokens, completion_tokens, cached_tokens)
        self._submit_final(
            reservation,
            "settlement",
            delta=reservation.amount_micro - charge,
            charge=charge,
            status=status,
            timing=timing,
            tokens=(prompt_tokens, completion_tokens, cached_tokens),
            source=source,
        )
        self._mark(reservation, "settled", charge)
        return charge

    async def charge_taken(self, reservation: Reservation) -> int | None:
        """As :meth:`teegate.ledger.ledger.Ledger.charge_taken` (waits for the commit)."""
        await self.flush()
        return await self._admin.charge_taken(reservation.id)

    async def release(
        self, reservation: Reservation, reason: str, timing: Timing | None = None
    ) -> None:
        if reservation.state != "open":
            return
        self._check_own(reservation)
        _check_text("reason", reason)
        self._finalize_release(reservation, reason, timing)

    def _finalize_release(self, res: Reservation, reason: str, timing: Timing | None) -> None:
        if res.state != "open":
            return
        self._submit_final(
            res, "release", delta=res.amount_micro, charge=0, status=reason, timing=timing
        )
        self._mark(res, "released", 0)

    def _submit_final(
        self,
        res: Reservation,
        kind: str,
        *,
        delta: int,
        charge: int,
        status: str,
        timing: Timing | None,
        tokens: tuple[int | None, int | None, int | None] = (None, None, None),
        source: str | None = None,
    ) -> None:
        op = {
            "t": "f",
            "kind": kind,
            "reservation_id": res.id,
            "account_id": res.account_id,
            "delta": delta,
            "charge": charge,
            "prompt_tokens": tokens[0],
            "completion_tokens": tokens[1],
            "cached_tokens": tokens[2],
            "source": source,
            "status": status,
            "start_ms": timing.start_ms if timing else None,
            "first_byte_ms": timing.first_byte_ms if timing else None,
            "end_ms": timing.end_ms if timing else None,
            "finalized_ms": now_ms(),
            "request_id": res.request_id,
            "model": res.model,
        }
        self._writer.submit(op, wait=False)

    def _mark(self, res: Reservation, state: str, charge: int) -> None:
        res.state = state  # type: ignore[assignment]
        res.charge_micro = charge
        self._open.pop(res.id, None)

    def _check_own(self, res: Reservation) -> None:
        if self._open.get(res.id) is not res:
            raise LedgerError(f"reservation {res.id} is not open in this ledger")

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
        _log_recovered(recovered)
        self.recovered.extend(recovered)
        return recovered

    sweep = recover

    async def verify(self) -> VerifyReport:
        await self.flush()
        return await self._admin.verify()

    async def usage(
        self,
        *,
        account_id: int | None = None,
        key_id: int | None = None,
        model: str | None = None,
        since_ms: int | None = None,
    ) -> list[UsageGroup]:
        return await self._admin.usage_report(
            account_id=account_id, key_id=key_id, model=model, since_ms=since_ms
        )

    async def usage_timeline(self, *, since_ms: int, bucket_ms: int) -> list[UsageBucket]:
        return await self._admin.usage_timeline(since_ms=since_ms, bucket_ms=bucket_ms)

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
        while True:
            await asyncio.sleep(self._key_poll_s)
            try:
                await self.refresh()
            except Exception as e:
                log.error("ledger.refresh_failed", error=type(e).__name__)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            try:
                await self.recover()
            except Exception as e:
                log.error("ledger.sweep_failed", error=type(e).__name__)


def _log_recovered(recovered: list[Recovered]) -> None:
    for r in recovered:
        log.warning(
            "ledger.recovered_reservation",
            reservation_id=r.reservation_id,
            request_id=r.request_id,
            account_id=r.account_id,
            key_id=r.key_id,
            model=r.model,
            charged_micro=r.charged_micro,
            rule="open and its worker gone: charged the full reserved amount",
        )


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"{name} must be a string of at most {MAX_TEXT} characters")

