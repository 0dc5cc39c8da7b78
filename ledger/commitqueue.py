"""The group commit's queue, shared by both stores' writers: when a batch goes, and how far.

:class:`CommitQueue` is the base of :class:`teegate.ledger.writer.GroupCommitter` (SQLite) and
:class:`teegate.ledger.pgwriter.PgCommitter` (PostgreSQL). Both queue operations, let one drain
at a time commit everything queued (up to ``batch_max``) and let settlements, which nobody
awaits, linger for the next reservation's commit or go on their own after
``settle_linger_ms`` (the reasons are in :mod:`teegate.ledger.writer`). That scheduling is
written once here; a subclass says how one batch is committed (:meth:`_commit`) and what a
failure does to its operations.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from teegate.ledger.errors import LedgerUnavailable


@dataclass(eq=False, slots=True)
class Item:
    op: Any  # the writer's operation; None marks a flush point
    future: asyncio.Future[Any] | None  # what the caller awaits (None: nobody)
    hold: int = 0  # SQLite: what was debited in memory for this op, released at commit
    abandoned: Callable[[Any], None] | None = None
    """PostgreSQL: called with the committed row when the waiter gave up before it landed."""


class CommitQueue:
    """Queue, drain, linger and back off; :meth:`_commit` is the dialect's."""

    _task_name = "ledger-writer"

    def __init__(self, *, batch_max: int, settle_linger_ms: float, batch_ms: float = 0.0) -> None:
        if batch_ms < 0 or batch_max < 1 or settle_linger_ms < 0:
            raise ValueError("batch_ms, settle_linger_ms must be >= 0 and batch_max >= 1")
        self._batch_s = batch_ms / 1000
        self._batch_max = batch_max
        self._settle_linger_s = settle_linger_ms / 1000
        self._queue: deque[Item] = deque()
        self._waiting = 0  # queued items someone awaits: reservations and flush points
        self._drainer: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None  # settlements alone, waiting
        self._starting = False  # inside _start_drain (an eager drain task runs in there)
        self._inflight: list[Item] = []  # the batch being committed
        self._started = False
        self._stopping = False
        self._failures = 0
        self.commits = 0  # number of transactions committed (for measurement)

    async def _commit(self, batch: list[Item]) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._started = True
        self._kick()

    def _enqueue(self, item: Item) -> asyncio.Future[Any] | None:
        self._queue.append(item)
        self._waiting += item.future is not None
        self._kick()
        return item.future

    def _new_future(self, wait: bool) -> asyncio.Future[Any] | None:
        """A future for a caller that waits (LedgerUnavailable once the writer stopped)."""
        if self._stopping or not self._started:
            raise LedgerUnavailable("the ledger is closed")
        return asyncio.get_running_loop().create_future() if wait else None

    @property
    def failures(self) -> int:
        """Consecutive failed commits (0 once one succeeds)."""
        return self._failures

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed."""
        if not self._started or (self._stopping and self._drainer is None):
            if self._queue:
                raise LedgerUnavailable("the ledger writer is not running")
            return
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(Item(None, future))
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
        """Have the queue committed now, unless a commit is in flight or only settlements wait.

        A waited-for operation starts its commit at once, before its caller awaits: the
        drain is a task, and mitmproxy's loop starts tasks eagerly, so the batch is on its
        way to the database (SQLite: queued on the connection's thread) before the request
        hook yields. Deferring the start by one loop iteration, as this did before, let that
        iteration's requests share the batch, but under concurrent streams an iteration is
        what costs (tens of ms), and the requests that arrive while a commit runs are batched
        anyway: SQLite takes them in its express follow-up right after the COMMIT
        (:mod:`teegate.ledger.writer`), PostgreSQL in the drain's next batch.

        Settlements linger: nobody waits for them, and committing each on its own
        doubled the commits a request costs, and with them the fsyncs (or round
        trips) that the next reservation then waited behind. So they ride along
        with the next reservation's commit, or go on their own after
        ``settle_linger_ms`` (50 ms by default), whichever comes first.
        """
        if self._drainer is not None or self._starting or not self._queue or not self._started:
            return
        if self._waiting or self._stopping or not self._settle_linger_s:
            self._start_drain(False)
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(
                self._settle_linger_s, self._start_drain, True
            )

    def _start_drain(self, force: bool) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._drainer is None and self._queue and not self._starting:
            self._starting = True  # an eager task runs up to its first await inside create_task
            try:
                task = asyncio.get_running_loop().create_task(
                    self._drain(force), name=self._task_name
                )
            finally:
                self._starting = False
            if not task.done():
                self._drainer = task
            else:  # finished eagerly: its own last _kick was refused while starting
                self._kick()

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

    async def _back_off(self) -> None:
        """After a failed commit: wait longer the more commits failed in a row."""
        await asyncio.sleep(min(2.0, 0.05 * 2**self._failures))
        self._failures = min(self._failures + 1, 10)

    def _requeue(self, items: list[Item]) -> None:
        """Operations to commit again, ahead of everything queued since."""
        self._queue.extendleft(reversed(items))
        self._waiting += sum(1 for i in items if i.future is not None)


def resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def reject(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)

