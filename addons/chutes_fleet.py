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

import httpx
import structlog
from teegate.catalog.attestation import Policy, Verdict
from teegate.catalog.attestation.chutes import (
    ChutesEvidenceClient,
    ChutesVerifier,
    model_verdict,
)
from teegate.catalog.attestation.source import EvidenceFetchError
from teegate.catalog.chutes.pool import InstancePool, PoolSettings

if TYPE_CHECKING:
    from teegate.catalog.models import CatalogModel

    from teegate.config import UpstreamSettings

log = structlog.get_logger("teegate.attestation")

NO_CHUTE = "attestation failed: the catalog lists no chute_id for this model"
PENDING = "attestation pending: no instance verified yet"
NOT_LISTED = "attestation failed: model is not attested"


class ChutesFleet:
    """The pools of a Chutes upstream, by model id, and the loop that keeps them verified."""

    def __init__(
        self,
        policy: Policy,
        upstream: UpstreamSettings,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._fetcher = ChutesEvidenceClient(upstream.origin, upstream.resolved_api_key(), client)
        self._verifier = ChutesVerifier(policy, clock=clock)
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
        self._settled: set[str] = set()  # pools that finished their first refill
        self._listeners: list[Callable[[Verdict], None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def on_verdict(self, listener: Callable[[Verdict], None]) -> None:
        self._listeners.append(listener)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="chutes-fleet")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for pool in self._pools.values():
            await pool.aclose()

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
            self._pools[model.id] = InstancePool(
                model.id,
                model.chute_id,
                fetcher=self._fetcher,
                verifier=self._verifier,
                clock=self._clock,
                settings=self._settings,
                root=self._verifier.root,  # type: ignore[arg-type]
                retry_interval_s=self._policy.retry_interval_s,
            )
        self._wake.set()

    def _drop(self, model_id: str) -> None:
        self._chutes.pop(model_id, None)
        self._settled.discard(model_id)
        pool = self._pools.pop(model_id, None)
        if pool is not None:
            asyncio.ensure_future(pool.aclose())

    async def _run(self) -> None:
        """Refill (discovery, then evidence when due) each pool: new pools at once, the
        others every ``retry_interval_s``, so idle models keep a current verdict too. The
        pool bounds its own discovery and evidence calls."""
        while True:
            self._wake.clear()
            for model_id, pool in list(self._pools.items()):
                try:
                    await pool.refill()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # one chute's surprise must not stop the others
                    log.error("chutes_refill_error", model=model_id, error=type(e).__name__)
                if self._pools.get(model_id) is pool:
                    self._settled.add(model_id)
                    verdict = pool.verdict()
                    for listener in self._listeners:
                        listener(verdict)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._policy.retry_interval_s)

    # -- reads ---------------------------------------------------------------------------

    def pool(self, model_id: str) -> InstancePool | None:
        return self._pools.get(model_id)

    def verdict(self, model_id: str) -> Verdict | None:
        pool = self._pools.get(model_id)
        if pool is None or model_id not in self._settled:
            return None
        return pool.verdict()

    def refusal(self, model_id: str) -> str | None:
        if model_id not in self._chutes:
            return NOT_LISTED
        pool = self._pools.get(model_id)
        if pool is None:
            return NO_CHUTE
        if model_id not in self._settled:
            return PENDING
        return pool.verdict().refusal(self._clock())

    def pending(self, model_id: str) -> bool:
        return model_id in self._pools and model_id not in self._settled

    async def attest_now(self, model_id: str, nonce: bytes) -> Verdict:
        """Every known instance re-verified against a client's ``nonce``: answers that client
        only (the pool keeps relying on nonces the gateway chose)."""
        pool = self._pools.get(model_id)
        now = int(self._clock())
        if pool is None:
            return model_verdict(
                model_id,
                [],
                now=now,
                root=self._verifier.root,
                retry_s=self._policy.retry_interval_s,
            )
        keys = {v.instance_id: v.e2e_pubkey for v in pool.instance_verdicts()}
        nonce_hex = nonce.hex()
        try:
            doc = await self._fetcher.evidence(pool.chute_id, nonce_hex)
        except EvidenceFetchError as e:
            v = model_verdict(
                model_id,
                [],
                now=now,
                root=self._verifier.root,
                retry_s=self._policy.retry_interval_s,
            )
            return v.model_copy(update={"reason": f"attestation failed: evidence unavailable: {e}"})
        verdicts = await self._verifier(model_id, keys, doc, nonce_hex)
        v = model_verdict(
            model_id,
            verdicts,
            now=now,
            root=self._verifier.root,
            retry_s=self._policy.retry_interval_s,
        )
        return v.model_copy(update={"nonce": nonce_hex, "evidence": doc})
