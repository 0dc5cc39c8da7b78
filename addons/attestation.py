"""Owns the attestation service: one cached verdict per confidential model.

Built in ``running`` from the ``[attestation]`` table (a :class:`Policy`), fed the catalog's
model ids after every refresh, stopped in ``done``. The request path only reads what it
cached (:meth:`refusal`, :meth:`verdict`); no attestation I/O happens there, except for a
client who explicitly asks for fresh evidence (the report endpoint).

Fail closed: until the service runs, every model is refused.

With a Chutes upstream (``upstream.kind = "chutes"``) in dcap mode, the verdicts come from
per-instance verification instead (:mod:`teegate.addons.chutes_fleet`, one instance pool per
model): a model is served while at least one of its instances verified, and its attestation
object lists them. In flag mode nothing is verified whatever the upstream kind, and nothing is
end-to-end encrypted (there is no verified key to encrypt to): flag never claims more.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from teegate.addons.catalogsync import CatalogSync
from teegate.catalog.attestation import AttestationService, NearAiSource, Policy, Verdict
from teegate.catalog.store import Snapshot

if TYPE_CHECKING:
    from teegate.addons.chutes_fleet import ChutesFleet
    from teegate.catalog.chutes.pool import InstancePool
    from teegate.config import UpstreamSettings

log = structlog.get_logger("teegate.attestation")

NOT_RUNNING = "attestation unavailable: the attestation service is not running"
FLAG_BASIS = "catalog confidential flag only; no hardware attestation was verified"
TEST_ROOT_WARNING = (
    "attestation.test_root_ca is set: quotes are verified against a TEST root CA ({path}), "
    "not Intel's. Anything signed by that test PKI passes as hardware-attested. Never use "
    "this outside tests and the sandbox."
)
GPU_TEST_ROOT_WARNING = (
    "attestation.gpu_test_root_ca is set: GPU evidence is verified against a TEST root "
    "({path}), not NVIDIA's. Never use this outside tests and the sandbox."
)


class AttestationSync:
    def __init__(self, policy: Policy, upstream: UpstreamSettings, catalog: CatalogSync) -> None:
        self.policy = policy
        self._upstream = upstream
        self._catalog = catalog
        self.service: AttestationService | None = None
        self.fleet: ChutesFleet | None = None
        self._client: httpx.AsyncClient | None = None
        self._stored = asyncio.Event()  # set (and replaced) whenever a verdict is stored

    @property
    def mode(self) -> str:
        return self.policy.mode

    @property
    def per_instance(self) -> bool:
        """Chutes evidence, verified instance by instance (dcap mode only)."""
        return self._upstream.kind == "chutes" and self.policy.mode == "dcap"

    @property
    def sealed(self) -> bool:
        """Whether chats are end-to-end encrypted to a verified instance's key."""
        return self.per_instance and self._upstream.e2ee

    def pool(self, model: str) -> InstancePool | None:
        return self.fleet.pool(model) if self.fleet is not None else None

    async def running(self) -> None:
        up = self._upstream
        self._client = httpx.AsyncClient(
            verify=up.verify, timeout=self.policy.fetch_timeout_s, trust_env=False
        )
        if self.policy.mode == "dcap" and self.policy.test_root_ca is not None:
            # Loud on purpose, and not subject to the log level: this setting is for tests.
            print(
                "WARNING: " + TEST_ROOT_WARNING.format(path=self.policy.test_root_ca),
                file=sys.stderr,
                flush=True,
            )
        if self.policy.mode == "dcap" and self.policy.gpu_test_root_ca is not None:
            print(
                "WARNING: " + GPU_TEST_ROOT_WARNING.format(path=self.policy.gpu_test_root_ca),
                file=sys.stderr,
                flush=True,
            )
        log.info(
            "attestation_started",
            mode=self.policy.mode,
            evidence=up.kind,
            root="test" if self.policy.test_root_ca else "intel",
        )
        if self.per_instance:
            await self._start_fleet()
            return
        source = NearAiSource(up.origin, up.resolved_api_key(), self._client)
        self.service = AttestationService(source, self.policy)
        self.service.on_verdict(self._on_verdict)
        await self.service.start()
        catalog = self._catalog.catalog
        if catalog is not None:
            catalog.on_change(self.service.set_models)
            if catalog.snapshot is not None:
                self.service.set_models(catalog.snapshot.models)

    async def _start_fleet(self) -> None:
        from teegate.addons.chutes_fleet import ChutesFleet  # only for a Chutes upstream

        assert self._client is not None
        self.fleet = ChutesFleet(self.policy, self._upstream, self._client)
        self.fleet.on_verdict(self._on_verdict)
        catalog = self._catalog.catalog
        if catalog is None:
            return

        def changed(_ids: Iterable[str]) -> None:
            snap = catalog.snapshot
            if snap is not None and self.fleet is not None:
                self.fleet.set_models(snap.models.values())

        catalog.on_change(changed)
        changed(())

    async def done(self) -> None:
        if self.fleet is not None:
            await self.fleet.stop()
        if self.service is not None:
            await self.service.stop()
        if self._client is not None:
            await self._client.aclose()

    @property
    def started(self) -> bool:
        return self.service is not None or self.fleet is not None

    async def attest_now(self, model: str, nonce: bytes) -> Verdict:
        """Fresh evidence bound to a client's ``nonce``, verified now (answers that client)."""
        if self.fleet is not None:
            return await self.fleet.attest_now(model, nonce)
        assert self.service is not None
        return await self.service.attest_now(model, nonce)

    def withdraw(self, model: str, reason: str, *, reattest_now: bool = False) -> None:
        """Refuse ``model`` until it re-attests (NEAR/Phala verdicts; see the service)."""
        if self.service is not None:
            self.service.withdraw(model, reason, reattest_now=reattest_now)

    # -- reads for the request path -----------------------------------------------------

    def verdict(self, model: str) -> Verdict | None:
        if self.fleet is not None:
            return self.fleet.verdict(model)
        return self.service.verdict(model) if self.service is not None else None

    def refusal(self, model: str) -> str | None:
        """Why ``model`` must be refused now (None: it may be served)."""
        if self.fleet is not None:
            return self.fleet.refusal(model)
        if self.service is None:
            return NOT_RUNNING
        return self.service.refusal(model)

    def pending(self, model: str) -> bool:
        """Known to the service but not attested even once yet (it was just listed)."""
        if self.fleet is not None:
            return self.fleet.pending(model)
        return self.service is not None and self.service.verdict(model) is None

    async def first_verdicts(self, models: Iterable[str], within_s: float) -> None:
        """Wait (bounded) until none of ``models`` is still awaiting its first attestation.

        The catalog's first load gets the same bounded wait: a model that has just appeared
        is attested within moments, and refusing it meanwhile would only make clients retry.
        The wait reads the cache; it never attests anything itself.
        """
        ids = list(models)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while any(self.pending(m) for m in ids):
                    await self._stored.wait()

    def _on_verdict(self, _verdict: Verdict) -> None:
        # Wake every waiter, then start a new generation for the next ones to wait on.
        self._stored.set()
        self._stored = asyncio.Event()

    def served(self, snap: Snapshot) -> list[str]:
        """The catalog's models the gate would serve now, in catalog order."""
        return [m for m in snap.models if self.refusal(m) is None]

    def describe(self, model: str) -> dict[str, Any]:
        """The ``attestation`` object of a model in ``/v1/models``."""
        v = self.verdict(model)
        if self.policy.mode == "flag" or v is None or v.mode == "flag":
            return {
                "mode": self.policy.mode,
                "verified": False,
                "basis": FLAG_BASIS if self.policy.mode == "flag" else self.refusal(model),
                "verified_at": None,
                "expires_at": None,
                "tee_type": None,
                "tcb_status": None,
                "quote_sha256": None,
                "signing_address": None,
                "root": None,
                "gpu": "unverified",
                "evidence": None,
                "instances": [],
                "e2ee": False,
            }
        refusal = v.refusal(time.time())
        return {
            "mode": v.mode,
            "verified": refusal is None,
            "basis": refusal or v.reason,
            "verified_at": v.verified_at,
            "expires_at": v.expires_at,
            "tee_type": v.tee_type,
            "tcb_status": v.tcb_status,
            "quote_sha256": v.quote_sha256,
            "signing_address": v.signing_address,
            "root": v.root,
            "gpu": v.gpu_summary(),
            **self.instances(v),
        }

    def instances(self, v: Verdict) -> dict[str, Any]:
        """Which evidence verified the model, which instances, and whether chats are sealed."""
        now = time.time()
        shown = [
            i.summary() | {"usable": i.ok and now < i.expires_at}
            for i in getattr(v, "instances", ())
        ]
        return {
            "evidence": getattr(v, "evidence_kind", "near"),
            "instances": shown,
            "e2ee": self.sealed,
        }
