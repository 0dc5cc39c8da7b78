"""Keeping a fresh verdict for every confidential model, off the request path.

A background task attests each known model (fresh nonce, evidence from the upstream,
collateral from PCCS or the cache, dcap-qvl), stores the verdict, and re-attests on schedule:
``reattest_interval_s`` after a success, ``retry_interval_s`` after a failure, at once when a
model appears or its signing key is seen to change. The gate only calls :meth:`verdict` or
:meth:`refusal`: a dictionary read and an integer comparison, never I/O.

In ``flag`` mode no hardware is verified: verdicts say mode "flag" and trust the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from teegate.catalog.attestation.collateral import CollateralCache, CollateralInput
from teegate.catalog.attestation.evidence import EvidenceError
from teegate.catalog.attestation.policy import Policy
from teegate.catalog.attestation.source import EvidenceFetchError, EvidenceSource
from teegate.catalog.attestation.verdict import Verdict
from teegate.catalog.attestation.verifier import verify_evidence

log = structlog.get_logger("teegate.attestation")

NEVER = sys.maxsize


class AttestationService:
    """One cached verdict per model, refreshed by a background task."""

    def __init__(
        self,
        source: EvidenceSource,
        policy: Policy,
        *,
        collateral: CollateralCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.policy = policy
        self._clock = clock
        self._root_ca_der = policy.load_test_root() if policy.mode == "dcap" else None
        if self._root_ca_der is not None:
            log.warning(
                "attestation_test_root_in_use",
                message="quotes are verified against a TEST root CA, not Intel's: "
                "never use this setting in production",
                path=str(policy.test_root_ca),
            )
        self._collateral = collateral or CollateralCache(
            policy.pccs_url, timeout_s=policy.fetch_timeout_s
        )
        self._models: set[str] = set()
        self._verdicts: dict[str, Verdict] = {}
        self._due: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._sem = asyncio.Semaphore(policy.max_concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[Verdict], None]] = []

    # -- the gate's side: sync and cheap -----------------------------------------------

    def verdict(self, model: str) -> Verdict | None:
        """The current verdict for ``model`` (None before its first attestation)."""
        return self._verdicts.get(model)

    def refusal(self, model: str) -> str | None:
        """Why the gate must refuse ``model`` now, or None when it may be served."""
        v = self._verdicts.get(model)
        if v is None:
            if model in self._models:
                return "attestation pending: not yet attested"
            return "attestation failed: model is not attested"
        return v.refusal(self._clock())

    def on_verdict(self, listener: Callable[[Verdict], None]) -> None:
        """Call ``listener(verdict)`` whenever a model's cached verdict is replaced, so a
        caller waiting for a model's first verdict need not poll."""
        self._listeners.append(listener)

    def note_signing_key(self, model: str, address: str) -> None:
        """Report the signing key the upstream used for ``model`` (e.g. on a signed
        response). A key the current verdict does not vouch for withdraws the verdict at
        once and triggers a re-attestation."""
        v = self._verdicts.get(model)
        if v is None or v.mode != "dcap" or not v.ok:
            return
        seen = address.lower().removeprefix("0x")
        if any(seen == a.lower().removeprefix("0x") for a in v.signing_addresses):
            return
        now = int(self._clock())
        self._verdicts[model] = v.model_copy(
            update={
                "ok": False,
                "reason": "attestation failed: upstream signing key changed, re-attesting",
                "expires_at": now,
            }
        )
        self._schedule(model, now)

    def withdraw(self, model: str, reason: str, *, reattest_now: bool = False) -> None:
        """Fail ``model``'s verdict now (e.g. an answer whose signature did not verify): it is
        refused until a fresh attestation passes, which is tried ``retry_interval_s`` from now
        (the same pace as after a failed attestation), not at once: the quote itself was fine,
        so re-attesting at once would only put the model back in service unchanged.
        ``reattest_now``: when the cause may be passing (the upstream could not be reached)."""
        v = self._verdicts.get(model)
        if v is None or v.mode != "dcap" or not v.ok:
            return
        now = int(self._clock())
        self._verdicts[model] = v.model_copy(
            update={"ok": False, "reason": f"attestation failed: {reason}", "expires_at": now}
        )
        log.warning("attestation_withdrawn", model=model, reason=reason)
        self._schedule(model, now if reattest_now else now + self.policy.retry_interval_s)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="attestation-scheduler")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._inflight.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._task = None
        self._inflight.clear()

    def kick(self) -> None:
        """Re-read the clock and the schedule now: the scheduler sleeps until the next due
        time, which a wall-clock jump (suspend/resume, a test's clock) can move."""
        self._wake.set()

    def set_models(self, ids: Iterable[str]) -> None:
        """The catalog's current confidential models: new ones are attested at once, gone
        ones forgotten (their verdicts dropped, so they are refused)."""
        wanted = set(ids)
        now = self._clock()
        for gone in self._models - wanted:
            self._verdicts.pop(gone, None)
            self._due.pop(gone, None)
            task = self._inflight.pop(gone, None)
            if task is not None:
                task.cancel()
        for new in wanted - self._models:
            if self.policy.mode == "flag":
                self._verdicts[new] = self._flag_verdict(new, int(now))
            else:
                self._due[new] = now
        self._models = wanted
        self._wake.set()

    # -- attesting ---------------------------------------------------------------------

    async def attest_now(self, model: str, nonce: bytes | None = None) -> Verdict:
        """Fresh evidence for ``model``, verified now. With our own nonce (``nonce=None``) the
        verdict also replaces the cached one; a client's nonce only answers that client, since
        freshness we rely on must come from a nonce we chose."""
        own = nonce is None
        if nonce is None:
            nonce = secrets.token_bytes(32)
        if len(nonce) != 32:
            raise ValueError("nonce must be 32 bytes")
        if self.policy.mode == "flag":
            return await self._flag_with_evidence(model, nonce)
        async with self._sem:
            verdict = await self._attest(model, nonce)
        if own and model in self._models:
            self._store(verdict)
        return verdict

    def _flag_verdict(
        self, model: str, now: int, evidence: dict[str, Any] | None = None
    ) -> Verdict:
        return Verdict(
            model=model,
            ok=True,
            reason="flag mode: the catalog's confidential flag is trusted; "
            "no hardware attestation was verified",
            mode="flag",
            verified_at=now,
            expires_at=NEVER,
            evidence=evidence or {},
        )

    async def _flag_with_evidence(self, model: str, nonce: bytes) -> Verdict:
        """Flag mode still hands clients the upstream's evidence, unverified, if it has any."""
        try:
            evidence = await asyncio.wait_for(
                self.source.fetch(model, nonce), self.policy.fetch_timeout_s
            )
        except (EvidenceFetchError, TimeoutError):
            evidence = {}
        return self._flag_verdict(model, int(self._clock()), evidence)

    def _failure(self, model: str, nonce: bytes, reason: str, evidence: dict[str, Any]) -> Verdict:
        now = int(self._clock())
        return Verdict(
            model=model,
            ok=False,
            reason=f"attestation failed: {reason}",
            mode="dcap",
            verified_at=now,
            expires_at=now + self.policy.retry_interval_s,
            root="intel" if self._root_ca_der is None else "test",
            nonce=nonce.hex(),
            evidence=evidence,
        )

    async def _attest(self, model: str, nonce: bytes) -> Verdict:
        try:
            evidence = await asyncio.wait_for(
                self.source.fetch(model, nonce), self.policy.fetch_timeout_s
            )
        except EvidenceFetchError as e:
            return self._failure(model, nonce, f"evidence unavailable: {e}", {})
        except TimeoutError:
            return self._failure(model, nonce, "evidence unavailable: timed out", {})
        now = int(self._clock())
        try:
            collateral = await self._collateral_for(evidence, now)
        except EvidenceError:
            collateral = {}  # verify_evidence reports the malformed evidence itself
        except (ValueError, RuntimeError, TimeoutError) as e:
            reason = f"collateral unavailable: {str(e) or type(e).__name__}"
            return self._failure(model, nonce, reason, evidence)
        return await asyncio.to_thread(
            verify_evidence,
            evidence,
            nonce=nonce,
            policy=self.policy,
            collateral=lambda quote: collateral.get(quote),
            now=now,
            root_ca_der=self._root_ca_der,
            model=model,
            parse=self.source.parse,
        )

    async def _collateral_for(
        self, evidence: dict[str, Any], now: int
    ) -> dict[bytes, CollateralInput]:
        """Collateral per quote: shipped in the evidence only under the explicit test root
        (the sandbox), otherwise fetched from PCCS (cached until nextUpdate)."""
        found: dict[bytes, CollateralInput] = {}
        for node in self.source.parse(evidence):
            if self._root_ca_der is not None and node.collateral is not None:
                found[node.quote] = node.collateral
            else:
                found[node.quote] = await self._collateral.get(node.quote, now)
        return found

    def _store(self, verdict: Verdict) -> None:
        previous = self._verdicts.get(verdict.model)
        self._verdicts[verdict.model] = verdict
        next_at = verdict.verified_at + (
            self.policy.reattest_interval_s if verdict.ok else self.policy.retry_interval_s
        )
        # A re-attestation requested while this one was in flight keeps its earlier time.
        self._schedule(verdict.model, min(next_at, self._due.get(verdict.model, next_at)))
        for listener in self._listeners:
            listener(verdict)
        if previous is None or previous.ok != verdict.ok or previous.reason != verdict.reason:
            log.info(
                "attestation_verdict", model=verdict.model, ok=verdict.ok, reason=verdict.reason
            )

    def _schedule(self, model: str, at: float) -> None:
        if model in self._models:
            self._due[model] = at
            self._wake.set()

    async def _attest_scheduled(self, model: str) -> None:
        try:
            async with self._sem:
                if model not in self._models:
                    return
                verdict = await self._attest(model, secrets.token_bytes(32))
            if model in self._models:
                self._store(verdict)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never let one model's surprise kill the scheduler
            log.exception("attestation_error", model=model, error=type(e).__name__)
            if model in self._models:
                self._store(self._failure(model, b"", f"internal error: {type(e).__name__}", {}))
        finally:
            if self._inflight.get(model) is asyncio.current_task():
                del self._inflight[model]
            self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock()
            for model, due in list(self._due.items()):
                if due <= now and model not in self._inflight:
                    del self._due[model]
                    self._inflight[model] = asyncio.create_task(
                        self._attest_scheduled(model), name=f"attest:{model}"
                    )
            timeout = None
            if self._due:
                timeout = max(0.0, min(self._due.values()) - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
