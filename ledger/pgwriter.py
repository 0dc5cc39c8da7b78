"""Group commit for the PostgreSQL ledger: one ``teegate_apply`` call per batch.

The same shape as :mod:`teegate.ledger.writer` (read its docstring for why):
callers queue operations, one drain at a time commits everything queued (up to
``batch_max``) in one statement, so concurrent requests share a round trip and
a commit; settlements and releases, which nobody waits for, ride along with
the next reservation or go on their own after ``settle_linger_ms``.

What differs: nothing is checked or held in memory. Each operation's outcome
(reserved, refused for want of balance, rate-limited, finalised, duplicate)
comes back from the database as one row, in submission order.

Failures (fail closed, never lose a charge):

* a batch that broke a constraint is retried one operation at a time;
* a reservation whose batch failed fails its caller
  (:class:`~teegate.ledger.errors.LedgerUnavailable`): the request must not go
  upstream. (If the commit did happen and only the answer was lost, the
  reservation stays open under this worker's id and is charged in full when the
  worker's lock is next free: the documented upper bound, never a loss.)
* a settlement or release whose batch failed is retried with backoff; applying
  one twice is harmless (the second is reported ``duplicate``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from teegate.ledger.errors import LedgerUnavailable
from teegate.ledger.ops import Finalization, NewReservation

log = structlog.get_logger("teegate.ledger")

Row = tuple[Any, ...]  # (ord, outcome, entry_id, balance, n1, n2)


@dataclass(eq=False, slots=True)
class _Item:
    op: dict[str, Any] | None  # None marks a flush point
    future: asyncio.Future[Any] | None


class PgCommitter:
    def __init__(
        self,
        apply: Callable[[list[dict[str, Any]]], Awaitable[list[Row]]],
        on_final: Callable[[dict[str, Any], Row | None, Exception | None], None],
        observe: Callable[[dict[str, Any], Row], None],
        *,
        batch_max: int,
        settle_linger_ms: float,
    ) -> None:
        if batch_max < 1 or settle_linger_ms < 0:
            raise ValueError("batch_max must be >= 1 and settle_linger_ms >= 0")
        self._apply = apply
        self._on_final = on_final
        self._observe = observe
        self._batch_max = batch_max
        self._linger_s = settle_linger_ms / 1000
        self._queue: deque[_Item] = deque()
        self._waiting = 0
        self._drainer: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._start: asyncio.Handle | None = None
        self._started = False
        self._stopping = False
        self._failures = 0
        self.commits = 0

    @property
    def failures(self) -> int:
        """Consecutive failed commits (0 once one succeeds)."""
        return self._failures

    def start(self) -> None:
        self._started = True
        self._kick()

    def submit(self, op: dict[str, Any], *, wait: bool) -> asyncio.Future[Any] | None:
        if self._stopping or not self._started:
            raise LedgerUnavailable("the ledger is closed")
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append(_Item(op, future))
        self._waiting += wait
        self._kick()
        return future

    def queued_final_ids(self) -> set[int]:
        return {
            int(i.op["reservation_id"]) for i in self._queue if i.op and i.op["t"] == "f"
        }

    async def flush(self) -> None:
        if not self._started or (self._stopping and self._drainer is None):
            if self._queue:
                raise LedgerUnavailable("the ledger writer is not running")
            return
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(None, future))
        self._waiting += 1
        self._kick()
        await future

    async def stop(self) -> None:
        self._stopping = True
        while True:
            if self._drainer is None and self._queue:
                self._start_drain(True)
            if self._drainer is None:
                return
            await asyncio.shield(self._drainer)

    def _kick(self) -> None:
        if self._drainer is not None or self._start is not None or not self._queue:
            return
        if not self._started:
            return
        loop = asyncio.get_running_loop()
        if self._waiting or self._stopping or not self._linger_s:
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            self._start = loop.call_soon(self._start_drain, False)
        elif self._linger is None:
            self._linger = loop.call_later(self._linger_s, self._start_drain, True)

    def _start_drain(self, force: bool) -> None:
        for handle in (self._start, self._linger):
            if handle is not None:
                handle.cancel()
        self._start = self._linger = None
        if self._drainer is None and self._queue:
            task = asyncio.get_running_loop().create_task(self._drain(force), name="pg-writer")
            if not task.done():
                self._drainer = task

    async def _drain(self, force: bool) -> None:
        try:
            while self._queue and (force or self._waiting or self._stopping):
                n = min(self._batch_max, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                self._waiting -= sum(1 for i in batch if i.future is not None)
                force = False
                await self._commit(batch)
        finally:
            self._drainer = None
            self._kick()

    async def _commit(self, batch: list[_Item]) -> None:
        ops = [i for i in batch if i.op is not None]
        try:
            rows = await self._apply([i.op for i in ops]) if ops else []  # type: ignore[misc]
        except psycopg.errors.IntegrityError as e:
            if len(ops) > 1:
                for item in batch:  # isolate the offending operation
                    await self._commit([item])
                return
            self._fail(batch, e, retry=False)
            return
        except Exception as e:  # any other database failure is handled alike
            self._fail(batch, e, retry=True)
            await asyncio.sleep(min(2.0, 0.05 * 2**self._failures))
            self._failures = min(self._failures + 1, 10)
            return
        self._failures = 0
        self.commits += 1
        by_ord = {int(r[0]): r for r in rows}
        for n, item in enumerate(ops, start=1):
            row = by_ord.get(n)
            if row is not None:
                self._observe(item.op, row)  # type: ignore[arg-type]
            if item.future is not None:
                if row is None:
                    _reject(item.future, LedgerUnavailable("the ledger lost track of a commit"))
                else:
                    _resolve(item.future, row)
            else:
                self._on_final(item.op, row, None)  # type: ignore[arg-type]
        for item in batch:
            if item.op is None:
                _resolve(item.future, None)

    def _fail(self, batch: list[_Item], error: Exception, *, retry: bool) -> None:
        requeue: list[_Item] = []
        for item in batch:
            if item.op is None:
                _reject(item.future, LedgerUnavailable(f"could not commit: {error}"))
            elif item.future is not None:
                _reject(
                    item.future,
                    LedgerUnavailable(f"could not commit the reservation: {type(error).__name__}"),
                )
            elif retry and not self._stopping:
                requeue.append(item)
            else:
                self._on_final(item.op, None, error)
        if requeue:
            log.warning("ledger.commit_retry", operations=len(requeue), error=type(error).__name__)
            self._queue.extendleft(reversed(requeue))


def _resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)


def reservation_row(op: NewReservation, rate_limit: int | None) -> dict[str, Any]:
    """A reservation as ``teegate_apply`` reads it (one element of its ``ops`` array)."""
    return {
        "t": "r",
        "request_id": op.request_id,
        "account_id": op.account_id,
        "key_id": op.key_id,
        "model": op.model,
        "price_input": op.prices.input,
        "price_output": op.prices.output,
        "price_cache_read": op.prices.cache_read,
        "amount": op.amount_micro,
        "created_ms": op.created_ms,
        "rate_limit": rate_limit,
    }


def final_row(op: Finalization) -> dict[str, Any]:
    """A settlement or release as ``teegate_apply`` reads it."""
    timing = op.timing
    return {
        "t": "f",
        "kind": op.kind,
        "reservation_id": op.reservation_id,
        "account_id": op.account_id,
        "delta": op.delta_micro,
        "charge": op.charge_micro,
        "prompt_tokens": op.prompt_tokens,
        "completion_tokens": op.completion_tokens,
        "cached_tokens": op.cached_tokens,
        "source": op.source,
        "status": op.status,
        "start_ms": timing.start_ms if timing else None,
        "first_byte_ms": timing.first_byte_ms if timing else None,
        "end_ms": timing.end_ms if timing else None,
        "finalized_ms": op.finalized_ms,
        "request_id": op.request_id,
        "model": op.model,
    }
