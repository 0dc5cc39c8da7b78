"""Group commit for the PostgreSQL ledger: one ``teegate_apply`` call per batch.

The same queue as :mod:`teegate.ledger.writer` (read its docstring for why; the
scheduling is :class:`teegate.ledger.commitqueue.CommitQueue`, shared by both):
callers queue operations, one drain at a time commits everything queued (up to
``batch_max``) in one statement, so concurrent requests share a round trip and
a commit; settlements and releases, which nobody waits for, ride along with
the next reservation or go on their own after ``settle_linger_ms``. Operations
travel as the JSON rows ``teegate_apply`` reads (:func:`reservation_row`, :func:`final_row`).

What differs: nothing is checked or held in memory. Each operation's outcome
(reserved, refused for want of balance, rate-limited, finalised, duplicate)
comes back from the database as one row, in submission order.

Failures (fail closed, never lose a charge):

* a batch that broke a constraint is retried one operation at a time;
* a reservation whose batch failed fails its caller
  (:class:`~teegate.ledger.errors.LedgerUnavailable`): the request must not go
  upstream. Its commit is then *in doubt* (it may have happened, only the answer
  lost): ``on_doubt`` hands it to the ledger (:mod:`teegate.ledger.pgledger`
  ``_doubt``), which releases it if it did commit, once the writing connection is
  replaced (``_release_in_doubt``, after ``_end_old_session`` ended the old
  server session so nothing can commit later). It is charged in full only if it is
  not found there: another worker's sweep took it first (the lost connection freed
  this worker's lock), or this process ended before reconnecting, or more than
  ``MAX_IN_DOUBT`` were in doubt at once; the documented upper bound, never a loss;
* a reservation whose waiter gave up (its deadline passed) before the batch
  landed is released as soon as it lands (``abandoned``), not left open;
* a settlement or release whose batch failed is retried with backoff; applying
  one twice is harmless (the second is reported ``duplicate``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import structlog

from teegate.ledger.commitqueue import CommitQueue, Item, reject, resolve
from teegate.ledger.errors import LedgerUnavailable
from teegate.ledger.ops import Finalization, NewReservation

log = structlog.get_logger("teegate.ledger")

Row = tuple[Any, ...]  # (ord, outcome, entry_id, balance, n1, n2)


class PgCommitter(CommitQueue):
    """PostgreSQL's group commit: one ``teegate_apply`` call per batch (ops are its rows)."""

    _task_name = "pg-writer"

    def __init__(
        self,
        apply: Callable[[list[dict[str, Any]]], Awaitable[list[Row]]],
        on_final: Callable[[dict[str, Any], Row | None, Exception | None], None],
        observe: Callable[[dict[str, Any], Row], None],
        *,
        batch_max: int,
        settle_linger_ms: float,
        on_doubt: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(batch_max=batch_max, settle_linger_ms=settle_linger_ms)
        self._apply = apply
        self._on_final = on_final
        self._observe = observe
        self._on_doubt = on_doubt

    def submit(
        self,
        op: dict[str, Any],
        *,
        wait: bool,
        abandoned: Callable[[Row], None] | None = None,
    ) -> asyncio.Future[Any] | None:
        """Queue ``op``; ``abandoned(row)`` runs if its waiter cancelled the future (gave up)
        before the commit landed: a committed reservation nobody will use is released."""
        return self._enqueue(Item(op, self._new_future(wait), abandoned=abandoned))

    def queued_final_ids(self) -> set[int]:
        """Reservations whose settlement or release is queued or being committed now."""
        items = [*self._queue, *self._inflight]  # _inflight: CommitQueue's batch in commit
        return {int(i.op["reservation_id"]) for i in items if i.op and i.op["t"] == "f"}

    async def _commit(self, batch: list[Item]) -> None:
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
            await self._back_off()
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
                    reject(item.future, LedgerUnavailable("the ledger lost track of a commit"))
                elif item.future.cancelled() and item.abandoned is not None:
                    item.abandoned(row)
                else:
                    resolve(item.future, row)
            else:
                self._on_final(item.op, row, None)  # type: ignore[arg-type]
        for item in batch:
            if item.op is None:
                resolve(item.future, None)

    def _fail(self, batch: list[Item], error: Exception, *, retry: bool) -> None:
        requeue: list[Item] = []
        for item in batch:
            if item.op is None:
                reject(item.future, LedgerUnavailable(f"could not commit: {error}"))
            elif item.future is not None:
                if retry and self._on_doubt is not None:  # it may have committed all the same
                    self._on_doubt(item.op)
                reject(
                    item.future,
                    LedgerUnavailable(f"could not commit the reservation: {type(error).__name__}"),
                )
            elif retry and not self._stopping:
                requeue.append(item)
            else:
                self._on_final(item.op, None, error)
        if requeue:
            log.warning("ledger.commit_retry", operations=len(requeue), error=type(error).__name__)
            self._requeue(requeue)


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
