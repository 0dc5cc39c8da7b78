"""Group commit: every request-path entry is written here, many per transaction.

Callers put operations on a queue and (for reservations) await a future. One
drain at a time takes everything queued, up to ``batch_max`` operations, and
commits it in one transaction, so N concurrent requests pay for one fsync
instead of N. While one commit is in flight the next batch accumulates, so
under load batches grow by themselves: the batch window is the duration of the
previous commit. An extra linger (``batch_ms``) can be configured, but it costs
every lone reservation its full length while batches already grow under load by
themselves (bench/ledger_cost.py, docs/bench.md), so it defaults to 0. Settlements
and releases, which nobody waits for, ride along with the next reservation's commit,
or go on their own after ``settle_linger_ms`` (see :meth:`GroupCommitter._kick`).

Express: a reservation submitted while a commit is on the database thread does not wait
for that commit to come back to the event loop before its own starts. It goes into a
thread-safe lane that the database thread empties right after the COMMIT, in a follow-up
transaction of its own, and its waiter is resumed from there. Under concurrent streams a
turn of the event loop is what costs (each relays many chunks), and the ordinary path paid
two or three of them between one commit and the next (docs/bench.md, "Third round"). A
follow-up that fails is rolled back and its reservations take the ordinary path below;
what the thread did not take joins the ordinary queue when the commit returns. Lingering
settlements ride only with ordinary commits (or go after their linger).

Failure handling (fail closed, never lose a charge):

* a failed batch that hit a constraint is retried one operation at a time,
  so one bad operation cannot fail its neighbours;
* a reservation that cannot be committed fails its caller
  (:class:`~ledger.errors.LedgerUnavailable`), and its in-memory hold is undone:
  the request must not go upstream;
* a settlement or release that cannot be committed is retried with backoff.
  If the process dies first, its reservation is still open in the database
  and start-up recovery charges it in full -- the upper bound.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from teegate.ledger.balances import Balances
from teegate.ledger.errors import LedgerUnavailable
from teegate.ledger.ops import Finalization, NewReservation
from teegate.ledger.store import FollowUp, Store

log = structlog.get_logger("teegate.ledger")

Op = NewReservation | Finalization | None  # None marks a flush point
EXPRESS_ROUNDS = 4  # follow-up transactions per hand-off at most (the lock is held meanwhile)


@dataclass(eq=False, slots=True)
class _Item:
    op: Op
    hold: int  # what was debited in memory for this op, released into the committed balance
    future: asyncio.Future[Any] | None


class GroupCommitter:
    def __init__(
        self,
        store: Store,
        txn_lock: asyncio.Lock,
        balances: Balances,
        on_reserved: Callable[[NewReservation, int], Any],
        *,
        on_abandoned: Callable[[Any], Any] = lambda _: None,
        batch_ms: float,
        batch_max: int,
        settle_linger_ms: float = 50.0,
    ) -> None:
        if batch_ms < 0 or batch_max < 1 or settle_linger_ms < 0:
            raise ValueError("batch_ms, settle_linger_ms must be >= 0 and batch_max >= 1")
        self._store = store
        self._lock = txn_lock
        self._balances = balances
        self._on_reserved = on_reserved
        self._on_abandoned = on_abandoned  # a committed reservation whose waiter gave up
        self._batch_s = batch_ms / 1000
        self._batch_max = batch_max
        self._settle_linger_s = settle_linger_ms / 1000
        self._queue: deque[_Item] = deque()
        self._waiting = 0  # queued items someone awaits: reservations and flush points
        self._drainer: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None  # settlements alone, waiting
        self._start: asyncio.Handle | None = None  # a drain starting next iteration
        self._inflight: list[_Item] = []  # the batch being committed
        # Reservations submitted while a commit is on the database thread: taken from there
        # right after its COMMIT (thread-safe deque appends/pops; see _express_take).
        self._express: deque[_Item] = deque()
        self._express_open = False
        self._started = False
        self._stopping = False
        self._failures = 0
        self.commits = 0  # number of transactions committed (for measurement)
        self.express_commits = 0  # of which follow-ups on the database thread

    def start(self) -> None:
        self._started = True
        self._kick()

    def submit(
        self, op: NewReservation | Finalization, hold: int, *, wait: bool
    ) -> asyncio.Future[Any] | None:
        """Queue an operation; ``hold`` has already been debited in memory."""
        if self._stopping or not self._started:
            raise LedgerUnavailable("the ledger is closed")
        future = asyncio.get_running_loop().create_future() if wait else None
        item = _Item(op, hold, future)
        if self._express_open and isinstance(op, NewReservation) and future is not None:
            self._express.append(item)  # committed right after the commit in flight
            return future
        self._queue.append(item)
        self._waiting += wait
        self._kick()
        return future

    @property
    def failures(self) -> int:
        """Consecutive failed commits (0 once one succeeds)."""
        return self._failures

    def lingering(self, account_id: int) -> bool:
        """Whether settlements or releases of this account are waiting to commit."""
        return any(
            isinstance(i.op, Finalization) and i.op.account_id == account_id
            for i in (*self._inflight, *self._queue)
        )

    def queued_final_ids(self) -> set[int]:
        return {i.op.reservation_id for i in self._queue if isinstance(i.op, Finalization)}

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed."""
        if not self._started or (self._stopping and self._drainer is None):
            if self._queue:
                raise LedgerUnavailable("the ledger writer is not running")
            return
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(None, 0, future))
        self._waiting += 1
        self._kick()
        await future

    async def stop(self) -> None:
        """Commit what is queued (one last attempt for anything failing), then end."""
        self._stopping = True
        while True:
            if self._drainer is None and self._queue:
                self._start_drain(True)  # lingering settlements go now
            if self._drainer is None:
                return
            await asyncio.shield(self._drainer)

    def _kick(self) -> None:
        """Have the queue committed soon, unless a commit is in flight or only settlements wait.

        A commit starts one loop iteration after the first submit, so every
        request submitted in this iteration joins its batch (starting at once
        made smaller batches under load and no faster commits).

        Settlements linger: nobody waits for them (the in-memory balance already
        counts them), and committing each on its own doubled the commits a
        request costs, and with them the fsyncs and the database thread's turns
        on the GIL that the next reservation then waited behind. So they ride
        along with the next reservation's commit, or go on their own after
        ``settle_linger_ms`` (50 ms by default), whichever comes first.
        """
        if self._drainer is not None or self._start is not None or not self._queue:
            return
        if not self._started:
            return
        loop = asyncio.get_running_loop()
        if self._waiting or self._stopping or not self._settle_linger_s:
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            self._start = loop.call_soon(self._start_drain, False)
        elif self._linger is None:
            self._linger = loop.call_later(self._settle_linger_s, self._start_drain, True)

    def _start_drain(self, force: bool) -> None:
        for handle in (self._start, self._linger):
            if handle is not None:
                handle.cancel()
        self._start = self._linger = None
        if self._drainer is None and self._queue:
            task = asyncio.get_running_loop().create_task(self._drain(force), name="ledger-writer")
            if not task.done():  # an eager task may already have finished
                self._drainer = task

    async def _drain(self, force: bool = True) -> None:
        """Commit batches while someone waits (or ``force``: everything queued now)."""
        try:
            while self._queue and (force or self._waiting or self._stopping):
                if self._batch_s and len(self._queue) < self._batch_max and not self._stopping:
                    await asyncio.sleep(self._batch_s)  # linger: let concurrent requests join
                n = min(self._batch_max, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                self._waiting -= sum(1 for i in batch if i.future is not None)
                force = False
                self._inflight = batch
                await self._commit(batch)
                self._inflight = []  # committed: not "lingering" during a batch_ms sleep
        finally:
            self._inflight = []
            self._drainer = None
            self._kick()  # what is left lingers, or starts the next drain

    async def _commit(self, batch: list[_Item]) -> None:
        reservations = [i for i in batch if isinstance(i.op, NewReservation)]
        finals = [i for i in batch if isinstance(i.op, Finalization)]
        loop = asyncio.get_running_loop()
        landed: list[bool] = []

        def on_commit(result: tuple[list[int], dict[int, int]]) -> None:
            """On the loop thread, called as soon as the transaction is durable.

            Scheduled from the database thread right after COMMIT, so waiting
            requests resume one loop iteration sooner than if this ran when the
            writer task itself wakes. The writer still holds the transaction
            lock (it has not resumed), so no refresh interleaves.
            """
            if landed:
                return
            landed.append(True)
            try:
                ids, balances = result
                released: defaultdict[int, int] = defaultdict(int)
                for item in batch:
                    if item.op is not None and item.hold:
                        released[item.op.account_id] += item.hold
                self._balances.committed(released, balances)
                self.commits += 1
                for item, rid in zip(reservations, ids, strict=True):
                    reservation = self._on_reserved(item.op, rid)  # type: ignore[arg-type]
                    if item.future is not None and item.future.cancelled():
                        self._on_abandoned(reservation)  # its request was cancelled meanwhile
                    else:
                        _resolve(item.future, reservation)
                for item in batch:
                    if item.op is None:
                        _resolve(item.future, None)
            except Exception as e:  # a bug: fail the waiters closed rather than leave them hanging
                log.error("ledger.commit_bookkeeping_failed", error=type(e).__name__)
                for item in batch:
                    _reject(item.future, LedgerUnavailable("the ledger lost track of a commit"))

        follow = FollowUp(
            take=self._express_take,
            landed=lambda items, r: loop.call_soon_threadsafe(self._express_landed, items, r),
            failed=lambda items, e: loop.call_soon_threadsafe(self._express_failed, items),
            rounds=EXPRESS_ROUNDS,
        )
        try:
            async with self._lock:
                self._express_open = True
                try:
                    result = await self._store.apply_batch(
                        [i.op for i in reservations],  # type: ignore[misc]
                        [i.op for i in finals],  # type: ignore[misc]
                        on_commit=lambda r: loop.call_soon_threadsafe(on_commit, r),
                        follow_up=follow,
                    )
                finally:
                    self._express_open = False
                    self._express_leftovers()
                on_commit(result)  # no-op when the early call ran (it is queued first)
        except sqlite3.IntegrityError as e:
            if len(batch) > 1:
                for item in batch:  # isolate the offending operation
                    await self._commit([item])
                return
            self._fail(batch, e, retry=False, duplicate=True)
            return
        except Exception as e:  # any database failure is handled alike
            if landed:  # committed and accounted for: nothing to undo, and no retry
                log.error("ledger.after_commit_error", error=type(e).__name__)
                return
            self._fail(batch, e, retry=True)
            await asyncio.sleep(min(2.0, 0.05 * 2**self._failures))
            self._failures = min(self._failures + 1, 10)
            return
        self._failures = 0

    # -- express: reservations committed right after the commit in flight -------------

    def _express_take(self) -> list[_Item]:
        """On the database thread: the reservations waiting in the express lane."""
        taken: list[_Item] = []
        while self._express and len(taken) < self._batch_max:
            taken.append(self._express.popleft())  # deque.popleft: atomic under the GIL
        return taken

    def _express_landed(self, items: list[_Item], result: tuple[list[int], dict[int, int]]) -> None:
        """On the loop: an express batch committed; the bookkeeping of a landed batch."""
        try:
            ids, balances = result
            released: defaultdict[int, int] = defaultdict(int)
            for item in items:
                released[item.op.account_id] += item.hold  # type: ignore[union-attr]
            self._balances.committed(released, balances)
            self.commits += 1
            self.express_commits += 1
            for item, rid in zip(items, ids, strict=True):
                reservation = self._on_reserved(item.op, rid)  # type: ignore[arg-type]
                if item.future is not None and item.future.cancelled():
                    self._on_abandoned(reservation)
                else:
                    _resolve(item.future, reservation)
        except Exception as e:  # a bug: fail the waiters closed rather than leave them hanging
            log.error("ledger.commit_bookkeeping_failed", error=type(e).__name__)
            for item in items:
                _reject(item.future, LedgerUnavailable("the ledger lost track of a commit"))

    def _express_failed(self, items: list[_Item]) -> None:
        """On the loop: an express transaction was rolled back; the ordinary path retries
        its reservations (one at a time on a constraint, as any batch)."""
        self._queue.extendleft(reversed(items))
        self._waiting += sum(1 for i in items if i.future is not None)
        self._kick()

    def _express_leftovers(self) -> None:
        """On the loop, once the commit's call returned: what the database thread did not
        take (appended after its last look) goes first in the ordinary queue, ahead of any
        flush point queued after it was submitted."""
        left: list[_Item] = []
        while True:
            try:
                left.append(self._express.popleft())  # atomic: safe even if the thread
            except IndexError:  # still runs (a cancelled caller), each item goes one way
                break
        if left:
            self._queue.extendleft(reversed(left))
            self._waiting += len(left)
            self._kick()

    def _fail(
        self, batch: list[_Item], error: Exception, *, retry: bool, duplicate: bool = False
    ) -> None:
        requeue: list[_Item] = []
        for item in batch:
            op = item.op
            if isinstance(op, NewReservation):
                self._balances.unhold(op.account_id, item.hold)
                _reject(
                    item.future, LedgerUnavailable(f"could not commit the reservation: {error}")
                )
            elif isinstance(op, Finalization):
                if retry and not self._stopping:
                    requeue.append(item)
                    continue
                self._balances.unhold(op.account_id, item.hold)
                log.error(
                    "ledger.finalization_lost",
                    reservation_id=op.reservation_id,
                    account_id=op.account_id,
                    kind=op.kind,
                    error=str(error),
                    consequence=(
                        "already finalised in the database; this one is dropped"
                        if duplicate
                        else "the reservation stays open; recovery charges it in full"
                    ),
                )
            else:
                _reject(item.future, LedgerUnavailable(f"could not commit: {error}"))
        if requeue:
            log.warning("ledger.commit_retry", operations=len(requeue), error=str(error))
            self._queue.extendleft(reversed(requeue))  # committed with the next batch


def _resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
