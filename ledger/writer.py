"""Group commit: one task writes every request-path entry, many per transaction.

Callers put operations on a queue and (for reservations) await a future. The
writer takes everything queued, up to ``batch_max`` operations, and commits it
in one transaction, so N concurrent requests pay for one fsync instead of N.
While one commit is in flight the next batch accumulates, so under load
batches grow by themselves: the batch window is the duration of the previous
commit. An extra linger (``batch_ms``) can be configured, but measurements
(bench/ledger_cost.py: ~59 requests per commit at 64 concurrent requests
without it, and +2-3 ms on every lone reservation with it) make the default 0.

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

from ledger.balances import Balances
from ledger.errors import LedgerUnavailable
from ledger.ops import Finalization, NewReservation
from ledger.store import Store

log = structlog.get_logger("teegate.ledger")

Op = NewReservation | Finalization | None  # None marks a flush point


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
        batch_ms: float,
        batch_max: int,
    ) -> None:
        if batch_ms < 0 or batch_max < 1:
            raise ValueError("batch_ms must be >= 0 and batch_max >= 1")
        self._store = store
        self._lock = txn_lock
        self._balances = balances
        self._on_reserved = on_reserved
        self._batch_s = batch_ms / 1000
        self._batch_max = batch_max
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failures = 0
        self.commits = 0  # number of transactions committed (for measurement)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def submit(
        self, op: NewReservation | Finalization, hold: int, *, wait: bool
    ) -> asyncio.Future[Any] | None:
        """Queue an operation; ``hold`` has already been debited in memory."""
        if self._stopping or self._task is None or self._task.done():
            raise LedgerUnavailable("the ledger is closed")
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append(_Item(op, hold, future))
        self._wake.set()
        return future

    def queued_final_ids(self) -> set[int]:
        return {i.op.reservation_id for i in self._queue if isinstance(i.op, Finalization)}

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed."""
        if self._task is None or self._task.done():
            if self._queue:
                raise LedgerUnavailable("the ledger writer is not running")
            return
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(None, 0, future))
        self._wake.set()
        await future

    async def stop(self) -> None:
        """Commit what is queued (one last attempt for anything failing), then end."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self._batch_s and len(self._queue) < self._batch_max and not self._stopping:
                await asyncio.sleep(self._batch_s)  # linger: let concurrent requests join
            batch = [self._queue.popleft() for _ in range(min(self._batch_max, len(self._queue)))]
            if not self._queue:
                self._wake.clear()
            if batch:
                await self._commit(batch)
            if self._stopping and not self._queue:
                return

    async def _commit(self, batch: list[_Item]) -> None:
        reservations = [i for i in batch if isinstance(i.op, NewReservation)]
        finals = [i for i in batch if isinstance(i.op, Finalization)]
        try:
            async with self._lock:
                ids, balances = await self._store.apply_batch(
                    [i.op for i in reservations],  # type: ignore[misc]
                    [i.op for i in finals],  # type: ignore[misc]
                )
                # Synchronously, still under the lock: no refresh can interleave.
                released: defaultdict[int, int] = defaultdict(int)
                for item in batch:
                    if item.op is not None and item.hold:
                        released[item.op.account_id] += item.hold
                self._balances.committed(released, balances)
                results = [
                    self._on_reserved(i.op, rid)  # type: ignore[arg-type]
                    for i, rid in zip(reservations, ids, strict=True)
                ]
        except sqlite3.IntegrityError as e:
            if len(batch) > 1:
                for item in batch:  # isolate the offending operation
                    await self._commit([item])
                return
            self._fail(batch, e, retry=False, duplicate=True)
            return
        except Exception as e:  # any database failure is handled alike
            self._fail(batch, e, retry=True)
            await asyncio.sleep(min(2.0, 0.05 * 2**self._failures))
            self._failures = min(self._failures + 1, 10)
            return
        self._failures = 0
        self.commits += 1
        for item, result in zip(reservations, results, strict=True):
            _resolve(item.future, result)
        for item in batch:
            if item.op is None:
                _resolve(item.future, None)

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
            self._queue.extendleft(reversed(requeue))
            self._wake.set()


def _resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
