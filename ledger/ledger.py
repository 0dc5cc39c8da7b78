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

The methods both stores keep alike (authentication, operator writes, settle,
release, receipts, reports) are written once in :mod:`teegate.ledger.serving`;
this module keeps what SQLite's in-memory balances make its own: :meth:`Ledger.reserve`
(no ``await`` between a balance check and its debit), the hooks that keep those
balances right under the transaction lock, recovery and the refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import structlog

from teegate.ledger.balances import Balances
from teegate.ledger.errors import InsufficientBalance, LedgerUnavailable, UnknownAccount
from teegate.ledger.keycache import KeyCache
from teegate.ledger.keys import DEFAULT_PREFIX, check_prefix
from teegate.ledger.lockfile import WriterLock
from teegate.ledger.models import Recovered, Reservation
from teegate.ledger.ops import Finalization, NewReservation
from teegate.ledger.pgschema import is_postgres
from teegate.ledger.serving import ServingLedger, log_recovered
from teegate.ledger.store import Store
from teegate.ledger.writer import GroupCommitter

log = structlog.get_logger("teegate.ledger")


class Ledger(ServingLedger):
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
        self._store = self._writes = store
        self._reader = self._reads = reader
        self._file_lock = lock
        self._prefix = key_prefix
        self._refresh_s = refresh_ms / 1000
        self._txn_lock = asyncio.Lock()
        self._balances = Balances()
        self._keys = KeyCache()
        self._open = {}
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
        self._tasks = []
        self._data_version = -1
        self._closed = False
        self.recovered = []

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
        statement_timeout_ms: float | None = 5000.0,
    ) -> Ledger:
        """Open (creating/migrating) the database and start serving from it.

        A ``postgresql://`` URL opens a :class:`teegate.ledger.pgledger.PgLedger`
        instead (same methods; ``worker_id``, ``key_poll_ms``, ``sweep_interval_s`` and
        ``statement_timeout_ms`` apply to it only): one of many workers on one database.

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
                statement_timeout_ms=statement_timeout_ms,
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
            log_recovered(self.recovered, "open at start: charged the full reserved amount")
        self._writer.start()
        self._tasks = [
            self._every(self._refresh_s, self.refresh, "ledger.refresh_failed", "ledger-refresh")
        ]

    async def _release_connections(self) -> None:
        await self._store.close()
        await self._reader.close()
        self._file_lock.release()

    # -- dialect hooks (see teegate.ledger.serving) -----------------------------

    def _operator_lock(self) -> AbstractAsyncContextManager[Any]:
        # Operator writes must update the in-memory balances and the key cache under the
        # lock the group commit holds, so no commit's balances interleave with theirs.
        return self._txn_lock

    def _committed_balance(self, account_id: int, balance_micro: int) -> None:
        self._balances.set_committed(account_id, balance_micro)

    async def _write_all(self, statements: list[tuple[str, list[object]]]) -> None:
        # Queued on the connection's thread at once, unless a transaction of several round
        # trips is open there (an operator's write, a readiness probe: they hold the lock
        # throughout, so waiting for the lock waits them out). The group commit's own
        # transactions are single calls on the thread, so a batch queued while it holds the
        # lock simply runs before or after them: waiting for the lock as well made each group
        # commit that came next wait for this one's turn in the lock's line (a hand-off, a turn
        # of a busy loop, each). The result is awaited outside the lock (Store.queue_write_all).
        waits = self._txn_lock if self._store.open_transactions else contextlib.nullcontext()
        async with waits:
            written = self._store.queue_write_all(statements)
        await written

    def _queue_final(self, op: Finalization, hold: int) -> None:
        self._balances.hold(op.account_id, hold)
        try:
            self._writer.submit(op, hold, wait=False)
        except BaseException:
            self._balances.unhold(op.account_id, hold)
            raise

    def available_micro(self, account_id: int) -> int | None:
        """What the account could reserve right now (None if not loaded yet)."""
        if not self._balances.known(account_id):
            return None
        return self._balances.available(account_id)

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

    async def _reserve(self, op: NewReservation, rate_limit: int | None) -> Reservation:
        """The balance check in memory, then the commit (see the module docstring)."""
        if rate_limit is not None:
            raise ValueError("the SQLite ledger does not count rate limits")
        account_id, amount = op.account_id, op.amount_micro
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

    def _release_abandoned(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self._release_cancelled(future.result())

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
        """Pick up other processes' commits now; True if there were any.

        The version is read without the transaction lock (a read between any two
        transactions on this connection); only a change takes the lock, to reload the
        balances where no group commit's bookkeeping interleaves. Holding the lock for the
        read, every second, made each refresh a stall of the request path under concurrent
        streams: the reservations submitted meanwhile waited for a round trip to the database
        thread and back through a busy loop (a fifth of them, ~400 ms p50; docs/bench.md,
        "Session 6").
        """
        if await self._store.data_version() == self._data_version:
            return False
        async with self._txn_lock:
            version = await self._store.data_version()
            if version == self._data_version:
                return False
            self._balances.reload(await self._store.balances())
            self._keys.clear()
            self._data_version = version
            return True
