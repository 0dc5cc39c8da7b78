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
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from teegate.catalog.attestation import CollateralCache, Policy, Verdict
from teegate.catalog.attestation.chutes import model_verdict
from teegate.catalog.chutes.pool import InstancePool, PoolSettings, build_pool

if TYPE_CHECKING:
    from teegate.catalog.models import CatalogModel
    from teegate.config import UpstreamSettings

log = structlog.get_logger("teegate.attestation")

NO_CHUTE = "attestation failed: the catalog lists no chute_id for this model"
PENDING = "attestation pending: no instance verified yet"
NOT_LISTED = "attestation failed: model is not attested"


class ChutesFleet:
    """The pools of a Chutes upstream, by model id."""

    def __init__(
        self,
        policy: Policy,
        upstream: UpstreamSettings,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._upstream = upstream
        self._client = client
        self._clock = clock
        self._collateral = CollateralCache(policy.pccs_url, timeout_s=policy.fetch_timeout_s)
        self._root = "intel" if policy.test_root_ca is None else "test"
        # Re-verify on the attestation schedule; call the upstream no more often than it
        # allows (about 10 discoveries a minute), or than retry_interval_s when that is shorter.
        every = min(6.0, float(policy.retry_interval_s))
        self._settings = PoolSettings(
            discovery_interval_s=every,
            evidence_interval_s=every,
            reverify_interval_s=float(policy.reattest_interval_s),
        )
        self._pools: dict[str, InstancePool] = {}
        self._chutes: dict[str, str | None] = {}
        self._listeners: list[Callable[[Verdict], None]] = []
        self._tasks: set[asyncio.Future[None]] = set()

    def on_verdict(self, listener: Callable[[Verdict], None]) -> None:
        self._listeners.append(listener)

    def _stored(self, verdict: Verdict) -> None:
        for listener in self._listeners:
            listener(verdict)

    # -- lifecycle -----------------------------------------------------------------------

    async def stop(self) -> None:
        for model_id in list(self._chutes):
            self._drop(model_id)
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task

    def set_models(self, models: Iterable[CatalogModel]) -> None:
        """The catalog's confidential models: a pool for each new one (or changed chute_id),
        none for gone ones (refused from then on)."""
        wanted = {m.id: m for m in models}
        for gone in [i for i in self._chutes if i not in wanted]:
            self._drop(gone)
        for model in wanted.values():
            if model.id in self._chutes and self._chutes[model.id] == model.chute_id:
                continue
            self._drop(model.id)
            self._chutes[model.id] = model.chute_id
            if model.chute_id is None:
                log.warning("chutes_model_without_chute_id", model=model.id)
                continue
            pool = build_pool(
                model.id,
                model.chute_id,
                policy=self._policy,
                client=self._client,
                api_url=self._upstream.origin,
                api_key=self._upstream.resolved_api_key(),
                on_verdict=self._stored,
                collateral=self._collateral,
                settings=self._settings,
                clock=self._clock,
            )
            self._pools[model.id] = pool
            self._spawn(pool.start())

    def _drop(self, model_id: str) -> None:
        self._chutes.pop(model_id, None)
        pool = self._pools.pop(model_id, None)
        if pool is not None:
            self._spawn(pool.stop())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reads ---------------------------------------------------------------------------

    def pool(self, model_id: str) -> InstancePool | None:
        return self._pools.get(model_id)

    def verdict(self, model_id: str) -> Verdict | None:
        pool = self._pools.get(model_id)
        return pool.verdict if pool is not None else None

    def refusal(self, model_id: str) -> str | None:
        if model_id not in self._chutes:
            return NOT_LISTED
        pool = self._pools.get(model_id)
        if pool is None:
            return NO_CHUTE
        v = pool.verdict
        return PENDING if v is None else v.refusal(self._clock())

    def pending(self, model_id: str) -> bool:
        pool = self._pools.get(model_id)
        return pool is not None and pool.verdict is None

    async def attest_now(self, model_id: str, nonce: bytes) -> Verdict:
        """Every known instance re-verified against a client's ``nonce``: answers that client
        only (the pool keeps relying on nonces the gateway chose)."""
        pool = self._pools.get(model_id)
        if pool is None:
            now = int(self._clock())
            verdict = model_verdict(
                model_id, [], now=now, root=self._root, retry_s=self._policy.retry_interval_s
            )
            return verdict.model_copy(update={"reason": self.refusal(model_id) or NO_CHUTE})
        return await pool.attest_now(nonce)
