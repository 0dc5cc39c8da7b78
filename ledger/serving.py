"""What the serving ledger does the same on both stores: one implementation, dialect hooks.

:class:`ServingLedger` is the base of :class:`teegate.ledger.ledger.Ledger` (SQLite, balances
checked in memory) and :class:`teegate.ledger.pgledger.PgLedger` (PostgreSQL, balances checked
by the database). Authentication, the operator's writes, settling and releasing, receipts and
reports follow one contract (the docstring of :mod:`teegate.ledger.ledger`), so they are
written once here. What differs is a handful of hooks:

* :meth:`_operator_lock`: SQLite runs operator writes under the transaction lock, so they
  never interleave with a group commit and its in-memory balances; PostgreSQL needs none;
* :meth:`_committed_balance`: what an operator write's new balance updates in memory;
* :meth:`_queue_final`: how a settlement or release reaches the writer;
* :meth:`_reserve`: where the balance is checked (memory or database);
* :meth:`recover`, :meth:`refresh`, :meth:`writable`: their own.

Why this module is long: it is the one copy of about twenty request-path and operator
methods that used to be written twice (once per store) and must keep one contract line by
line; splitting them further would scatter that contract again.

Subclasses set ``_reads`` and ``_writes`` (the stores reports and operator writes go
through), ``_prefix``, ``_keys``, ``_open``, ``_writer``, ``_tasks`` and ``recovered``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Self

import structlog

from teegate.ledger import inputs, receipts
from teegate.ledger.admintokens import AdminTokens
from teegate.ledger.billing import Prices, charge_micro
from teegate.ledger.errors import LedgerError
from teegate.ledger.keycache import KeyCache
from teegate.ledger.keys import hash_key, plausible, same_hash
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
from teegate.ledger.operator import OperatorStore, now_ms
from teegate.ledger.ops import Finalization, NewReservation

log = structlog.get_logger("teegate.ledger")

MAX_TEXT = 200  # request ids, model names, statuses and release reasons


class ServingLedger:
    """The request path's ledger methods both stores share. Create a subclass with ``open``."""

    _reads: OperatorStore
    _writes: OperatorStore
    _prefix: str
    _keys: KeyCache
    _open: dict[int, Reservation]
    _writer: Any
    _tasks: list[asyncio.Task[None]]
    _closed: bool
    recovered: list[Recovered]

    # -- dialect hooks ------------------------------------------------------------

    def _operator_lock(self) -> AbstractAsyncContextManager[Any]:
        return contextlib.nullcontext()

    def _committed_balance(self, account_id: int, balance_micro: int) -> None:
        """An operator write committed this balance."""

    def _queue_final(self, op: Finalization, hold: int) -> None:
        """Hand a settlement or release to the writer (``hold``: its extra above the hold)."""
        raise NotImplementedError

    async def _reserve(self, op: NewReservation, rate_limit: int | None) -> Reservation:
        """Commit a checked reservation (the balance check is the dialect's)."""
        raise NotImplementedError

    async def _release_connections(self) -> None:
        """Close the stores (and locks) once the writer stopped."""
        raise NotImplementedError

    # -- life cycle -------------------------------------------------------------

    async def close(self) -> None:
        """Commit everything queued, then release the database (and this process's lock)."""
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
            await self._release_connections()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def key_prefix(self) -> str:
        """What every key of this ledger starts with (for a cheap shape check)."""
        return self._prefix

    async def flush(self) -> None:
        """Wait until every settlement/release queued so far is committed."""
        await self._writer.flush()

    def _every(
        self, seconds: float, job: Callable[[], Awaitable[object]], event: str, name: str
    ) -> asyncio.Task[None]:
        """A background task running ``job`` every ``seconds``; a failure is logged, not fatal."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await job()
                except Exception as e:  # keep serving; the next round retries
                    log.error(event, error=type(e).__name__)

        return asyncio.create_task(loop(), name=name)

    # -- keys and accounts ------------------------------------------------------

    async def authenticate(self, presented: str) -> ApiKey | None:
        """The active key ``presented`` is, or None. Never raises for bad input."""
        if not plausible(presented, self._prefix):
            return None
        digest = hash_key(presented)
        key = self._keys.get(digest)
        if key is not None:
            return key
        found = await self._reads.find_key(digest)
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
        """A new key for an account: ``(ApiKey, plaintext)``. Show the plaintext once."""
        async with self._operator_lock():
            acct = await self._writes.require_account(account)
            return await self._writes.create_key(
                acct.id, prefix=self._prefix, label=label, rate_limit=rate_limit
            )

    async def revoke_key(self, key_id: int) -> bool:
        """Revoke at once in this process (others: within their refresh); True if it was active."""
        async with self._operator_lock():
            changed = await self._writes.revoke_key(key_id)
            self._keys.drop_key(key_id)
        return changed

    async def create_account(self, name: str, *, topup_micro: int = 0) -> Account:
        async with self._operator_lock():
            account = await self._writes.create_account(name, topup_micro)
            self._committed_balance(account.id, account.balance_micro)
        return account

    async def account(self, account: int | str) -> Account | None:
        return await self._reads.find_account(account)

    async def list_accounts(self) -> list[Account]:
        return await self._reads.list_accounts()

    async def list_keys(
        self, account_id: int | None = None, *, key_id: int | None = None
    ) -> list[KeyInfo]:
        return await self._reads.list_keys(account_id, key_id=key_id)

    async def open_reservations(self, account_id: int | None = None) -> list[OpenReservation]:
        """Committed holds not yet settled, of one account or all (any process's or worker's)."""
        found = await self._reads.open_reservations()
        return [r for r in found if account_id is None or r.account_id == account_id]

    @property
    def open_count(self) -> int:
        """Reservations this process holds open right now (requests in flight)."""
        return len(self._open)

    # -- operator writes: the same store operations the command line makes -------

    async def topup(
        self,
        account: int | str,
        amount_micro: int,
        note: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Credit:
        """:meth:`OperatorStore.topup`, spendable at once (SQLite: in this process, with no
        refresh to wait for; PostgreSQL: by every worker, as each reservation reads the
        balance in the database)."""
        async with self._operator_lock():
            acct = await self._writes.require_account(account)
            credit = await self._writes.topup(
                acct.id, amount_micro, note, idempotency_key=idempotency_key
            )
            # SQLite: under the lock no group commit is in flight, so the stored balance is
            # the committed one. PostgreSQL: informational (see PgLedger.available_micro).
            self._committed_balance(acct.id, credit.balance_micro)
        return credit

    async def set_rate_limit(self, key_id: int, rate_limit: int | None) -> KeyInfo:
        """:meth:`OperatorStore.set_rate_limit`: at once in this process (other PostgreSQL
        workers: within ``key_poll_ms``, the trigger bumps ``key_version``)."""
        async with self._operator_lock():
            info = await self._writes.set_rate_limit(key_id, rate_limit)
            self._keys.drop_key(key_id)
        return info

    @property
    def admin_tokens(self) -> AdminTokens:
        return AdminTokens(self._reads)

    # -- receipts and response signatures ----------------------------------------

    async def write_receipts(
        self,
        stored: list[receipts.StoredReceipt],
        signatures: list[tuple[int, str]],
    ) -> None:
        """Receipts and signature outcomes (reservation id, status), in one transaction.

        A signature outcome names a reservation this process committed before its request
        went upstream, so its usage row exists (settled or not: the settlement does not
        touch ``signature``).
        """
        await self._write_all(receipts.statements(stored, signatures))

    async def _write_all(self, statements: list[tuple[str, list[object]]]) -> None:
        """Statements that touch no balance or key, in one transaction (SQLite: one call on
        the connection's thread, see :meth:`teegate.ledger.ledger.Ledger._write_all`)."""
        await self._writes.write_all(statements)

    async def receipt(self, receipt_id: str, key_id: int) -> str | None:
        """A stored receipt's signed JSON, only for the key that made its request."""
        return await receipts.read(self._reads, receipt_id, key_id)

    async def charge_taken(self, reservation: Reservation) -> int | None:
        """What :meth:`settle` took from the balance, once committed (waits for it): the
        price it returned, or less when priced above the reservation and the balance could
        not cover the extra. None when the reservation is not recorded as settled."""
        await self.flush()
        return await self._reads.charge_taken(reservation.id)

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

        Raises :class:`~teegate.ledger.errors.InsufficientBalance` (nothing written) if the
        balance is lower, :class:`~teegate.ledger.errors.LedgerUnavailable` if the hold could
        not be committed. Either way the request must not go upstream. ``rate_limit``: on
        PostgreSQL (:attr:`shared_rate_limits`) the request is first counted in the key's
        shared one-minute window (:class:`~teegate.ledger.errors.RateLimited` beyond it);
        SQLite counts limits per process and refuses one here (ValueError).
        """
        amount = inputs.hold_amount(amount_micro)
        _check_text("request_id", request_id)
        _check_text("model", model)
        if not isinstance(prices, Prices):
            raise TypeError("prices must be a ledger.billing.Prices")
        op = NewReservation(
            request_id=request_id,
            account_id=key.account_id,
            key_id=key.key_id,
            model=model,
            prices=prices,
            amount_micro=amount,
            created_ms=now_ms(),
        )
        return await self._reserve(op, rate_limit)

    def _registered(self, op: NewReservation, reservation_id: int) -> Reservation:
        """A reservation committed: its handle, now open in this ledger."""
        res = Reservation(
            id=reservation_id,
            request_id=op.request_id,
            account_id=op.account_id,
            key_id=op.key_id,
            model=op.model,
            prices=op.prices,
            amount_micro=op.amount_micro,
            created_ms=op.created_ms,
        )
        self._open[reservation_id] = res
        return res

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
        """Charge actual usage (see :mod:`teegate.ledger.ledger`); returns its price.

        Within the reservation, the price is the charge. Above it, the commit
        takes the extra only up to the account's balance and records the rest
        as unrecovered; on SQLite the in-memory balance counts the whole extra as
        spent until then, so no reservation is admitted on money the extra may take.

        Idempotent: once a reservation is settled or released, further calls
        change nothing and return what was charged (0 after a release).
        ``source`` is "usage" (the upstream's usage block) or "bytes" (the
        :func:`~ledger.billing.tokens_from_bytes` fallback). Invalid counts
        raise ValueError and leave the reservation open (so a crash or a
        later settle still charges it); do not release it instead.
        """
        if reservation.state != "open":
            return reservation.charge_micro or 0
        self._check_own(reservation)
        if source not in ("usage", "bytes"):
            raise ValueError('source must be "usage" or "bytes"')
        _check_text("status", status)
        charge = charge_micro(reservation.prices, prompt_tokens, completion_tokens, cached_tokens)
        delta = reservation.amount_micro - charge
        op = Finalization(
            reservation_id=reservation.id,
            account_id=reservation.account_id,
            kind="settlement",
            delta_micro=delta,
            charge_micro=charge,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            source=source,
            status=status,
            timing=timing,
            finalized_ms=now_ms(),
            request_id=reservation.request_id,
            model=reservation.model,
        )
        self._queue_final(op, max(0, -delta))
        self._mark(reservation, "settled", charge)
        return charge

    async def release(
        self, reservation: Reservation, reason: str, timing: Timing | None = None
    ) -> None:
        """Hand the whole hold back (the request never reached the upstream).

        Idempotent, and a no-op after a settlement.
        """
        if reservation.state != "open":
            return
        self._check_own(reservation)
        _check_text("reason", reason)
        self._finalize_release(reservation, reason, timing)

    def _finalize_release(self, res: Reservation, reason: str, timing: Timing | None) -> None:
        if res.state != "open":
            return
        op = Finalization(
            reservation_id=res.id,
            account_id=res.account_id,
            kind="release",
            delta_micro=res.amount_micro,
            charge_micro=0,
            status=reason,
            timing=timing,
            finalized_ms=now_ms(),
            request_id=res.request_id,
            model=res.model,
        )
        self._queue_final(op, 0)
        self._mark(res, "released", 0)

    def _release_cancelled(self, res: Reservation) -> None:
        """A reservation committed after its caller gave up: hand it back."""
        with contextlib.suppress(LedgerError):
            self._finalize_release(res, "cancelled before upstream", None)

    def _mark(self, res: Reservation, state: str, charge: int) -> None:
        res.state = state  # type: ignore[assignment]
        res.charge_micro = charge
        self._open.pop(res.id, None)

    def _check_own(self, res: Reservation) -> None:
        if self._open.get(res.id) is not res:
            raise LedgerError(f"reservation {res.id} is not open in this ledger")

    # -- checks -----------------------------------------------------------------

    async def verify(self) -> VerifyReport:
        """Recompute balances from entries after committing what is queued."""
        await self.flush()
        return await self._reads.verify()

    async def usage(
        self,
        *,
        account_id: int | None = None,
        key_id: int | None = None,
        model: str | None = None,
        since_ms: int | None = None,
    ) -> list[UsageGroup]:
        return await self._reads.usage_report(
            account_id=account_id, key_id=key_id, model=model, since_ms=since_ms
        )

    async def usage_timeline(self, *, since_ms: int, bucket_ms: int) -> list[UsageBucket]:
        return await self._reads.usage_timeline(since_ms=since_ms, bucket_ms=bucket_ms)


def log_recovered(recovered: list[Recovered], rule: str) -> None:
    """One warning per reservation charged in full by the crash rule."""
    for r in recovered:
        log.warning(
            "ledger.recovered_reservation",
            reservation_id=r.reservation_id,
            request_id=r.request_id,
            account_id=r.account_id,
            key_id=r.key_id,
            model=r.model,
            charged_micro=r.charged_micro,
            rule=rule,
        )


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"{name} must be a string of at most {MAX_TEXT} characters")
