"""One instance pool per confidential model of a Chutes upstream, kept in step with the catalog.

Why: with Chutes, what is attested is an instance, not a model. Each model's pool
(:class:`teegate.catalog.chutes.pool.InstancePool`) discovers the chute's instances, verifies
each one's quote and binding, and hands out tickets for verified instances only. The gateway
needs, per model, the same three answers the NEAR service gives (a verdict, why it must be
refused, and the attestation object shown to clients) plus the pool itself for the rewrite.
This module owns the pools: one per catalog model with a ``chute_id``, created when the model
appears, stopped when it goes. A model listed without a ``chute_id`` has no pool and is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import structlog
from teegate.catalog.attestation import Verdict

if TYPE_CHECKING:
    from teegate.catalog.chutes.pool import InstancePool
    from teegate.catalog.models import CatalogModel

log = structlog.get_logger("teegate.attestation")

NO_CHUTE = "attestation failed: the catalog lists no chute_id for this model"
PENDING = "attestation pending: no instance verified yet"

PoolFactory = Callable[["CatalogModel", Callable[[Verdict], None]], "InstancePool"]


class ChutesFleet:
    """The pools of a Chutes upstream, by model id."""

    def __init__(self, make_pool: PoolFactory, clock: Callable[[], float] = time.time) -> None:
        self._make_pool = make_pool
        self._clock = clock
        self._pools: dict[str, InstancePool] = {}
        self._chutes: dict[str, str | None] = {}
        self._listeners: list[Callable[[Verdict], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def on_verdict(self, listener: Callable[[Verdict], None]) -> None:
        self._listeners.append(listener)

    def _stored(self, verdict: Verdict) -> None:
        for listener in self._listeners:
            listener(verdict)

    def set_models(self, models: Iterable[CatalogModel]) -> None:
        """The catalog's confidential models: pools for new ones (or a changed chute_id),
        none for gone ones."""
        wanted = {m.id: m for m in models}
        for gone in [i for i in self._chutes if wanted.get(i) is None]:
            self._drop(gone)
        for model in wanted.values():
            if model.id in self._chutes and self._chutes[model.id] == model.chute_id:
                continue
            self._drop(model.id)
            self._chutes[model.id] = model.chute_id
            if model.chute_id is None:
                log.warning("chutes_model_without_chute_id", model=model.id)
                continue
            pool = self._make_pool(model, self._stored)
            self._pools[model.id] = pool
            self._spawn(pool.start())

    def _drop(self, model_id: str) -> None:
        self._chutes.pop(model_id, None)
        pool = self._pools.pop(model_id, None)
        if pool is not None:
            self._spawn(pool.stop())

    def _spawn(self, coro) -> None:  # noqa: ANN001 - a coroutine
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for model_id in list(self._chutes):
            self._drop(model_id)
        tasks = list(self._tasks)
        for t in tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await t

    def known(self, model_id: str) -> bool:
        return model_id in self._chutes

    def pool(self, model_id: str) -> InstancePool | None:
        return self._pools.get(model_id)

    def verdict(self, model_id: str) -> Verdict | None:
        pool = self._pools.get(model_id)
        return pool.verdict if pool is not None else None

    def refusal(self, model_id: str) -> str | None:
        if model_id not in self._chutes:
            return "attestation failed: model is not attested"
        pool = self._pools.get(model_id)
        if pool is None:
            return NO_CHUTE
        v = pool.verdict
        if v is None:
            return PENDING
        return v.refusal(self._clock())

    def pending(self, model_id: str) -> bool:
        pool = self._pools.get(model_id)
        return pool is not None and pool.verdict is None
