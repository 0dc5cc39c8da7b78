"""Owns the attestation service: one cached verdict per confidential model.

Built in ``running`` from the ``[attestation]`` table (a :class:`Policy`), fed the catalog's
model ids after every refresh, stopped in ``done``. The request path only reads what it
cached (:meth:`refusal`, :meth:`verdict`); no attestation I/O happens there, except for a
client who explicitly asks for fresh evidence (the report endpoint).

Fail closed: until the service runs, every model is refused.
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
    from teegate.config import UpstreamSettings

log = structlog.get_logger("teegate.attestation")

NOT_RUNNING = "attestation unavailable: the attestation service is not running"
FLAG_BASIS = "catalog confidential flag only; no hardware attestation was verified"
TEST_ROOT_WARNING = (
    "attestation.test_root_ca is set: quotes are verified against a TEST root CA ({path}), "
    "not Intel's. Anything signed by that test PKI passes as hardware-attested. Never use "
    "this outside tests and the sandbox."
)


class AttestationSync:
    def __init__(self, policy: Policy, upstream: UpstreamSettings, catalog: CatalogSync) -> None:
        self.policy = policy
        self._upstream = upstream
        self._catalog = catalog
        self.service: AttestationService | None = None
        self._client: httpx.AsyncClient | None = None
        self._stored = asyncio.Event()  # set (and replaced) whenever a verdict is stored

    @property
    def mode(self) -> str:
        return self.policy.mode

    async def running(self) -> None:
        up = self._upstream
        self._client = httpx.AsyncClient(
            verify=up.verify, timeout=self.policy.fetch_timeout_s, trust_env=False
        )
        source = NearAiSource(up.origin, up.resolved_api_key(), self._client)
        if self.policy.mode == "dcap" and self.policy.test_root_ca is not None:
            # Loud on purpose, and not subject to the log level: this setting is for tests.
            print(
                "WARNING: " + TEST_ROOT_WARNING.format(path=self.policy.test_root_ca),
                file=sys.stderr,
                flush=True,
            )
        self.service = AttestationService(source, self.policy)
        self.service.on_verdict(self._on_verdict)
        await self.service.start()
        log.info(
            "attestation_started",
            mode=self.policy.mode,
            root="test" if self.policy.test_root_ca else "intel",
        )
        catalog = self._catalog.catalog
        if catalog is not None:
            catalog.on_change(self.service.set_models)
            if catalog.snapshot is not None:
                self.service.set_models(catalog.snapshot.models)

    async def done(self) -> None:
        if self.service is not None:
            await self.service.stop()
        if self._client is not None:
            await self._client.aclose()

    # -- reads for the request path -----------------------------------------------------

    def verdict(self, model: str) -> Verdict | None:
        return self.service.verdict(model) if self.service is not None else None

    def refusal(self, model: str) -> str | None:
        """Why ``model`` must be refused now (None: it may be served)."""
        if self.service is None:
            return NOT_RUNNING
        return self.service.refusal(model)

    def pending(self, model: str) -> bool:
        """Known to the service but not attested even once yet (it was just listed)."""
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
            "gpu": v.gpu,
        }
