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
or go on their own after ``settle_linger_ms`` (see :meth:`GroupCommitter._kick`). That
scheduling is :class:`teegate.ledger.commitqueue.CommitQueue`, shared with PostgreSQL's writer;
this module adds SQLite's commit, its in-memory holds and the express lane.

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
from typing import Any

import structlog

from teegate.ledger.balances import Balances
from teegate.ledger.commitqueue import CommitQueue, Item, reject, resolve
from teegate.ledger.errors import LedgerUnavailable
from teegate.ledger.ops import Finalization, NewReservation
from teegate.ledger.store import FollowUp, Store

log = structlog.get_logger("teegate.ledger")

EXPRESS_ROUNDS = 4  # follow-up transactions per hand-off at most (the lock is held meanwhile)


class GroupCommitter(CommitQueue):
    """SQLite's group commit: one transaction on the database thread per batch, plus express."""

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
        super().__init__(
            batch_max=batch_max, settle_linger_ms=settle_linger_ms, batch_ms=batch_ms
        )
        self._store = store
        self._lock = txn_lock
        self._balances = balances
        self._on_reserved = on_reserved
        self._on_abandoned = on_abandoned  # a committed reservation whose waiter gave up
        # Reservations submitted while a commit is on the database thread: taken from there
        # right after its COMMIT (thread-safe deque appends/pops; see _express_take).
        self._express: deque[Item] = deque()
        self._express_open = False
        self.express_commits = 0  # of the commits, follow-ups on the database thread

    def submit(
        self, op: NewReservation | Finalization, hold: int, *, wait: bool
    ) -> asyncio.Future[Any] | None:
        """Queue an operation; ``hold`` has already been debited in memory."""
        future = self._new_future(wait)
        item = Item(op, future, hold)
        if self._express_open and isinstance(op, NewReservation) and future is not None:
            self._express.append(item)  # committed right after the commit in flight
            return future
        return self._enqueue(item)

    def lingering(self, account_id: int) -> bool:
        """Whether settlements or releases of this account are waiting to commit."""
        return any(
            isinstance(i.op, Finalization) and i.op.account_id == account_id
            for i in (*self._inflight, *self._queue)
        )

    def queued_final_ids(self) -> set[int]:
        return {i.op.reservation_id for i in self._queue if isinstance(i.op, Finalization)}

    async def _commit(self, batch: list[Item]) -> None:
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
            if not landed:
                landed.append(True)
                self._landed(batch, reservations, result)

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
            await self._back_off()
            return
        self._failures = 0

    # -- express: reservations committed right after the commit in flight -------------

    def _express_take(self) -> list[Item]:
        """On the database thread: the reservations waiting in the express lane."""
        taken: list[Item] = []
        while self._express and len(taken) < self._batch_max:
            taken.append(self._express.popleft())  # deque.popleft: atomic under the GIL
        return taken

    def _express_landed(self, items: list[Item], result: tuple[list[int], dict[int, int]]) -> None:
        """On the loop: an express batch committed."""
        self.express_commits += 1
        self._landed(items, items, result)

    def _landed(
        self,
        batch: list[Item],
        reservations: list[Item],
        result: tuple[list[int], dict[int, int]],
    ) -> None:
        """On the loop: the bookkeeping of a committed batch (its holds become committed
        balance, its waiters resume; a reservation whose waiter gave up is released)."""
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
                    resolve(item.future, reservation)
            for item in batch:
                if item.op is None:
                    resolve(item.future, None)
        except Exception as e:  # a bug: fail the waiters closed rather than leave them hanging
            log.error("ledger.commit_bookkeeping_failed", error=type(e).__name__)
            for item in batch:
                reject(item.future, LedgerUnavailable("the ledger lost track of a commit"))

    def _express_failed(self, items: list[Item]) -> None:
        """On the loop: an express transaction was rolled back; the ordinary path retries
        its reservations (one at a time on a constraint, as any batch)."""
        self._requeue(items)
        self._kick()

    def _express_leftovers(self) -> None:
        """On the loop, once the commit's call returned: what the database thread did not
        take (appended after its last look) goes first in the ordinary queue, ahead of any
        flush point queued after it was submitted."""
        left: list[Item] = []
        while True:
            try:
                left.append(self._express.popleft())  # atomic: safe even if the thread
            except IndexError:  # still runs (a cancelled caller), each item goes one way
                break
        if left:
            self._requeue(left)
            self._kick()

    def _fail(
        self, batch: list[Item], error: Exception, *, retry: bool, duplicate: bool = False
    ) -> None:
        requeue: list[Item] = []
        for item in batch:
            op = item.op
            if isinstance(op, NewReservation):
                self._balances.unhold(op.account_id, item.hold)
                reject(
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
                reject(item.future, LedgerUnavailable(f"could not commit: {error}"))
        if requeue:
            log.warning("ledger.commit_retry", operations=len(requeue), error=str(error))
            self._requeue(requeue)  # committed with the next batch

