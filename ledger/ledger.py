"""The ledger as the proxy uses it: authenticate, reserve, settle, release.

Typical use by the request path (one :class:`Ledger` per process, opened and
used on the event loop that serves requests)::

    ledger = await Ledger.open(path, key_prefix="vgpu_sk_")   # recovers, then serves
    key = await ledger.authenticate(bearer_token)             # None -> 401
    hold = reservation_micro(prices, body, max_tokens)
    res = await ledger.reserve(flow_id, key, model, prices, hold)
    #   InsufficientBalance -> 402; LedgerUnavailable -> 503; no upstream call
    ... forward upstream ...
    await ledger.settle(res, prompt, completion, cached, "usage", timing)
    #   never below zero: usage above the hold is charged up to the balance,
    #   the rest recorded as unrecovered (see "Settlement policy" below)
    #   or, with no usage block: completion = tokens_from_bytes(generated_bytes),
    #   source "bytes"; if the request never reached the upstream:
    await ledger.release(res, "upstream unreachable")
    await ledger.close()                                      # on shutdown

Durability promise
------------------
1. **A reservation is committed before the request may go upstream.**
   :meth:`Ledger.reserve` returns only after the reservation's entry is in a
   committed transaction (``synchronous=FULL``: fsynced, so it survives power
   loss as well as a crash). Concurrent reservations share one commit (group
   commit, :mod:`teegate.ledger.writer`), so the cost is amortised, not skipped.
2. **Settlements and releases are queued** and committed with the next
   reservation's batch, or on their own after ``settle_linger_ms`` (default
   50 ms) if no reservation comes first. The caller does not wait;
   :meth:`flush` and :meth:`close` do. (Committing each on its own doubled
   the commits per request, and the next reservation waited behind them.)
3. **Crash rule.** A reservation with neither settlement nor release when the
   ledger opens belongs to a process that died in between. Its request may
   have run to completion, and the reservation was the upper bound of what it
   could cost, so it is **settled at the full reserved amount** (source
   ``"recovered"``), and reported (:attr:`Ledger.recovered`, a log line each).
   Hence a crash can only lose the part of a charge *above* its reservation
   (see settle), never the reservation itself. :meth:`Ledger.close` commits
   every queued settlement; reservations still open then (requests in
   flight at shutdown) are treated like a crash's at the next start.

Balance checks happen in memory (:mod:`teegate.ledger.balances`) with no ``await``
between check and debit, so N concurrent reservations can never together
exceed the available balance. Only one process may serve from a database at
a time (:mod:`teegate.ledger.lockfile`); the operator's command line may still top up,
create and revoke keys meanwhile. Such changes from another process are
noticed through ``PRAGMA data_version`` every ``refresh_ms`` (default 1 s):
**a top-up becomes spendable, and a revocation takes effect, within
``refresh_ms`` of its commit**. Revocations through this object are immediate.

Settlement policy: **no balance ever goes below zero.** A request is charged
its actual usage at the prices captured at reservation. Usage priced above
the reservation (an upstream that ignored the budget, or a byte-count
fallback that overshoots it) is charged up to what the account has: the
settlement's transaction takes the extra from the balance as it stands in
that same transaction, ``MIN(extra, MAX(balance, 0))``, in SQL. The rest of
the price is recorded as *unrecovered* (``usage.unrecovered_micro``, shown by
``teegate usage`` and totalled by ``teegate ledger verify``) and logged at
warning level (``ledger.charge_above_reservation``: request id, model and
amounts). ``usage.charge_micro`` is always what was taken from the balance.

Which flows are settled at their full reservation without usage (an upstream
that never answered) is the request path's decision; see :mod:`teegate.addons.billing`.

Why this module is long: a third of it is the contract above, and the rest is
one class whose methods share one lock, the in-memory balances and the map of
open reservations; that no ``await`` falls between a balance check and its
debit is easiest to verify with all of them in one file. The operator writes the admin API
makes (top-up, rate limit) are here for the same reason: they must update those balances
and the key cache under that lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Self

import structlog

from teegate.ledger import inputs, receipts
from teegate.ledger.admintokens import AdminTokens
from teegate.ledger.balances import Balances
from teegate.ledger.billing import Prices, charge_micro
from teegate.ledger.errors import (
    InsufficientBalance,
    LedgerError,
    LedgerUnavailable,
    UnknownAccount,
)
from teegate.ledger.keycache import KeyCache
from teegate.ledger.keys import (
    DEFAULT_PREFIX,
    check_prefix,
    hash_key,
    plausible,
    same_hash,
)
from teegate.ledger.lockfile import WriterLock
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
from teegate.ledger.ops import Finalization, NewReservation
from teegate.ledger.pgschema import is_postgres
from teegate.ledger.store import Store, now_ms
from teegate.ledger.writer import GroupCommitter

log = structlog.get_logger("teegate.ledger")

MAX_REQUEST_ID = 200
MAX_MODEL = 200
MAX_STATUS = 200


class Ledger:
    """Prepaid balances for the request path. Create with :meth:`open`."""

    shared_rate_limits = False  # rate limits are counted per process (addons.ratelimit)
    worker_id: int | None = None  # one serving process per SQLite file

    def __init__(
        self,
        store: Store,
        reader: Store,
        lock: WriterLock,
        *,
        key_prefix: str,
        batch_ms: float,
        batch_max: int,
        settle_linger_ms: float,
        refresh_ms: float,
    ) -> None:
        self.path = store.path
        self._store = store
        self._reader = reader
        self._file_lock = lock
        self._prefix = key_prefix
        self._refresh_s = refresh_ms / 1000
        self._txn_lock = asyncio.Lock()
        self._balances = Balances()
        self._keys = KeyCache()
        self._open: dict[int, Reservation] = {}
        self._writer = GroupCommitter(
            store,
            self._txn_lock,
            self._balances,
            self._registered,
            on_abandoned=self._release_cancelled,
            batch_ms=batch_ms,
            batch_max=batch_max,
            settle_linger_ms=settle_linger_ms,
        )
        self._refresher: asyncio.Task[None] | None = None
        self._data_version = -1
        self._closed = False
        self.recovered: list[Recovered] = []

    # -- life cycle -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        key_prefix: str = DEFAULT_PREFIX,
        batch_ms: float = 0.0,
        batch_max: int = 256,
        settle_linger_ms: float = 50.0,
        refresh_ms: float = 1000.0,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
        recover: bool = True,
        worker_id: int | None = None,
        key_poll_ms: float = 200.0,
        sweep_interval_s: float = 10.0,
    ) -> Ledger:
        """Open (creating/migrating) the database and start serving from it.

        A ``postgresql://`` URL opens a :class:`teegate.ledger.pgledger.PgLedger`
        instead (same methods; ``worker_id``, ``key_poll_ms`` and
        ``sweep_interval_s`` apply to it only): one of many workers on one database.

        Takes the serving lock (:class:`~ledger.errors.LedgerLocked` if another
        process holds it), then -- unless ``recover=False`` -- settles every
        reservation left open by a previous process (see the module docstring),
        available afterwards as :attr:`recovered`.
        """
        if is_postgres(path):
            from teegate.ledger.pgledger import PgLedger

            return await PgLedger.open(  # type: ignore[return-value]
                str(path),
                key_prefix=key_prefix,
                batch_max=batch_max,
                settle_linger_ms=settle_linger_ms,
                key_poll_ms=key_poll_ms,
                sweep_interval_s=sweep_interval_s,
                worker_id=worker_id,
                recover=recover,
            )
        path = str(path)
        check_prefix(key_prefix)
        if refresh_ms <= 0:
            raise ValueError("refresh_ms must be positive")
        lock = WriterLock(path)
        lock.acquire()
        store = reader = None
        try:
            store = await Store.open(path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
            reader = await Store.open(path, busy_timeout_ms=busy_timeout_ms)
            ledger = cls(
                store,
                reader,
                lock,
                key_prefix=key_prefix,
                batch_ms=batch_ms,
                batch_max=batch_max,
                settle_linger_ms=settle_linger_ms,
                refresh_ms=refresh_ms,
            )
            await ledger._start(recover)
        except BaseException:
            for s in (store, reader):
                if s is not None:
                    await s.close()
            lock.release()
            raise
        return ledger

    async def _start(self, recover: bool) -> None:
        self._data_version = await self._store.data_version()
        self._balances.reload(await self._store.balances())
        if recover:
            self.recovered = await self._store.recover(exclude=set())
            for r in self.recovered:
                log.warning(
                    "ledger.recovered_reservation",
                    reservation_id=r.reservation_id,
                    request_id=r.request_id,
                    account_id=r.account_id,
                    key_id=r.key_id,
                    model=r.model,
                    charged_micro=r.charged_micro,
                    rule="open at start: charged the full reserved amount",
                )
        self._writer.start()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="ledger-refresh")

    async def close(self) -> None:
        """Commit everything queued, then release the database and the lock."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._writer.stop()
        finally:
            if self._refresher is not None:
                self._refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._refresher
            await self._store.close()
            await self._reader.close()
            self._file_lock.release()

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

    # -- keys -------------------------------------------------------------------

    async def authenticate(self, presented: str) -> ApiKey | None:
        """The active key ``presented`` is, or None. Never raises for bad input."""
        if not plausible(presented, self._prefix):
            return None
        digest = hash_key(presented)
        key = self._keys.get(digest)
        if key is not None:
            return key
        found = await self._reader.find_key(digest)
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
        async with self._txn_lock:
            acct = await self._store.require_account(account)
            return await self._store.create_key(
                acct.id, prefix=self._prefix, label=label, rate_limit=rate_limit
            )

    async def revoke_key(self, key_id: int) -> bool:
        """Revoke at once (in this process); True if it was active."""
        async with self._txn_lock:
            changed = await self._store.revoke_key(key_id)
            self._keys.drop_key(key_id)
        return changed

    # -- accounts ---------------------------------------------------------------

    async def create_account(self, name: str, *, topup_micro: int = 0) -> Account:
        async with self._txn_lock:
            account = await self._store.create_account(name, topup_micro)
            self._balances.set_committed(account.id, account.balance_micro)
        return account

    async def account(self, account: int | str) -> Account | None:
        return await self._reader.find_account(account)

    def available_micro(self, account_id: int) -> int | None:
        """What the account could reserve right now (None if not loaded yet)."""
        if not self._balances.known(account_id):
            return None
        return self._balances.available(account_id)

    async def list_accounts(self) -> list[Account]:
        return await self._reader.list_accounts()

    async def list_keys(
        self, account_id: int | None = None, *, key_id: int | None = None
    ) -> list[KeyInfo]:
        return await self._reader.list_keys(account_id, key_id=key_id)

    async def open_reservations(self, account_id: int | None = None) -> list[OpenReservation]:
        """Committed holds not yet settled, of one account or all (any process's)."""
        found = await self._reader.open_reservations()
        return [r for r in found if account_id is None or r.account_id == account_id]

    @property
    def open_count(self) -> int:
        """Reservations this process holds open right now (requests in flight)."""
        return len(self._open)

    # -- operator writes: the same Store operations the command line makes ------

    async def topup(
        self,
        account: int | str,
        amount_micro: int,
        note: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Credit:
        """:meth:`Store.topup`, spendable at once in this process (no refresh to wait for)."""
        async with self._txn_lock:
            acct = await self._store.require_account(account)
            credit = await self._store.topup(
                acct.id, amount_micro, note, idempotency_key=idempotency_key
            )
            # Under the lock no group commit is in flight: the stored balance is the committed one.
            self._balances.set_committed(acct.id, credit.balance_micro)
        return credit

    async def set_rate_limit(self, key_id: int, rate_limit: int | None) -> KeyInfo:
        """:meth:`Store.set_rate_limit`, effective at once in this process."""
        async with self._txn_lock:
            info = await self._store.set_rate_limit(key_id, rate_limit)
            self._keys.drop_key(key_id)
        return info

    @property
    def admin_tokens(self) -> AdminTokens:
        return AdminTokens(self._reader)

    async def writable(self) -> bool:
        """Whether a write could commit now: open, commits not failing, the write lock takable.

        Takes and rolls back SQLite's write lock (waiting at most the busy timeout), between
        two group commits; for readiness probes, not the request path.
        """
        if self._closed or self._writer.failures:
            return False
        try:
            async with self._txn_lock, self._store.transaction():
                pass
        except Exception:
            return False
        return True

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

        Raises :class:`InsufficientBalance` (nothing written) if the available
        balance is lower, :class:`LedgerUnavailable` if the hold could not be
        committed. Either way the request must not go upstream.
        ``rate_limit`` must be None here (limits are per process with SQLite,
        see :attr:`shared_rate_limits`).
        """
        if rate_limit is not None:
            raise ValueError("the SQLite ledger does not count rate limits")
        amount = inputs.hold_amount(amount_micro)
        _check_text("request_id", request_id, MAX_REQUEST_ID)
        _check_text("model", model, MAX_MODEL)
        if not isinstance(prices, Prices):
            raise TypeError("prices must be a ledger.billing.Prices")
        account_id = key.account_id
        if not self._balances.known(account_id):
            await self._load_account(account_id)
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        if amount > self._balances.available(account_id) and self._writer.lingering(account_id):
            # Settlements wait to share the next commit; their unused holds are not
            # spendable until committed. Commit them now rather than refuse for want of them.
            await self._writer.flush()
            if self._closed:
                raise LedgerUnavailable("the ledger is closed")
        # From here to submit(): no await, so the check and the debit are atomic.
        available = self._balances.available(account_id)
        if amount > available:
            raise InsufficientBalance(available, amount)
        op = NewReservation(
            request_id=request_id,
            account_id=account_id,
            key_id=key.key_id,
            model=model,
            prices=prices,
            amount_micro=amount,
            created_ms=now_ms(),
        )
        self._balances.hold(account_id, amount)
        try:
            future = self._writer.submit(op, amount, wait=True)
        except BaseException:
            self._balances.unhold(account_id, amount)
            raise
        assert future is not None
        # Awaited directly, not through asyncio.shield: each future in the chain from the
        # commit to this task costs one more turn of the event loop, and under concurrent
        # streams a turn is what delays the request leaving (docs/bench.md, "Third round").
        try:
            return await future
        except asyncio.CancelledError:
            # The caller gave up (client gone). Still pending: the cancel reached the future,
            # and the writer releases the reservation as it commits (_release_cancelled).
            # Already committed (cancelled while waking up): release it here.
            if future.done() and not future.cancelled():
                self._release_abandoned(future)
            raise

    def _registered(self, op: NewReservation, reservation_id: int) -> Reservation:
        """Called by the writer, under the lock, as the reservation commits."""
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

    def _release_abandoned(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self._release_cancelled(future.result())

    def _release_cancelled(self, res: Reservation) -> None:
        with contextlib.suppress(LedgerError):
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
        """Charge actual usage (see the module docstring); returns its price.

        Within the reservation, the price is the charge. Above it, the commit
        takes the extra only up to the account's balance and records the rest
        as unrecovered; the in-memory balance counts the whole extra as spent
        until then, so no reservation is admitted on money the extra may take.

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
        _check_text("status", status, MAX_STATUS)
        charge = charge_micro(reservation.prices, prompt_tokens, completion_tokens, cached_tokens)
        delta = reservation.amount_micro - charge
        overrun = max(0, -delta)
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
        self._balances.hold(reservation.account_id, overrun)
        try:
            self._writer.submit(op, overrun, wait=False)
        except BaseException:
            self._balances.unhold(reservation.account_id, overrun)
            raise
        self._mark(reservation, "settled", charge)
        return charge

    async def charge_taken(self, reservation: Reservation) -> int | None:
        """What :meth:`settle` took from the balance, once committed (waits for it): the
        price it returned, or less when priced above the reservation and the balance could
        not cover the extra. None when the reservation is not recorded as settled."""
        await self.flush()
        return await self._reader.charge_taken(reservation.id)

    async def release(
        self, reservation: Reservation, reason: str, timing: Timing | None = None
    ) -> None:
        """Hand the whole hold back (the request never reached the upstream).

        Idempotent, and a no-op after a settlement.
        """
        if reservation.state != "open":
            return
        self._check_own(reservation)
        _check_text("reason", reason, MAX_STATUS)
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
        )
        self._writer.submit(op, 0, wait=False)
        self._mark(res, "released", 0)

    def _mark(self, res: Reservation, state: str, charge: int) -> None:
        res.state = state  # type: ignore[assignment]
        res.charge_micro = charge
        self._open.pop(res.id, None)

    def _check_own(self, res: Reservation) -> None:
        if self._open.get(res.id) is not res:
            raise LedgerError(f"reservation {res.id} is not open in this ledger")

    # -- receipts and response signatures ----------------------------------------

    async def write_receipts(
        self,
        stored: list[receipts.StoredReceipt],
        signatures: list[tuple[int, str]],
    ) -> None:
        """Receipts and signature outcomes (reservation id, status), in one transaction."""
        async with self._txn_lock:
            await receipts.write(self._store, stored, signatures)

    async def receipt(self, receipt_id: str, key_id: int) -> str | None:
        """A stored receipt's signed JSON, only for the key that made its request."""
        return await receipts.read(self._reader, receipt_id, key_id)

    # -- checks -----------------------------------------------------------------

    async def recover(self) -> list[Recovered]:
        """Settle (in full) open reservations this process does not own.

        At :meth:`open` this is every open reservation; afterwards it only
        finds ones left by a previous process if ``open(recover=False)`` was used.
        """
        await self.flush()
        async with self._txn_lock:
            exclude = set(self._open) | self._writer.queued_final_ids()
            recovered = await self._store.recover(exclude)
        self.recovered.extend(recovered)
        return recovered

    async def verify(self) -> VerifyReport:
        """Recompute balances from entries after committing what is queued."""
        await self.flush()
        return await self._reader.verify()

    async def usage(
        self,
        *,
        account_id: int | None = None,
        key_id: int | None = None,
        model: str | None = None,
        since_ms: int | None = None,
    ) -> list[UsageGroup]:
        return await self._reader.usage_report(
            account_id=account_id, key_id=key_id, model=model, since_ms=since_ms
        )

    async def usage_timeline(self, *, since_ms: int, bucket_ms: int) -> list[UsageBucket]:
        return await self._reader.usage_timeline(since_ms=since_ms, bucket_ms=bucket_ms)

    # -- cross-process freshness ------------------------------------------------

    async def _load_account(self, account_id: int) -> None:
        async with self._txn_lock:
            if self._balances.known(account_id):
                return
            account = await self._store.find_account(account_id)
            if account is None:
                raise UnknownAccount(f"no account {account_id}")
            self._balances.set_committed(account_id, account.balance_micro)

    async def refresh(self) -> bool:
        """Pick up other processes' commits now; True if there were any."""
        async with self._txn_lock:
            version = await self._store.data_version()
            if version == self._data_version:
                return False
            self._balances.reload(await self._store.balances())
            self._keys.clear()
            self._data_version = version
            return True

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as e:  # keep serving; the next round retries
                log.error("ledger.refresh_failed", error=str(e))


def _check_text(name: str, value: object, limit: int) -> None:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{name} must be a string of at most {limit} characters")
