"""``GET /healthz`` and ``GET /readyz``, as load balancers and Kubernetes probe them.

``/healthz`` answers while the process (its event loop) runs. ``/readyz`` answers 200 only
when the gateway can serve a chat: a catalog younger than its staleness bound, at least one
model the attestation gate would serve now, and a ledger that can commit a write. Each check
is reported by name in the JSON body, and the status is 503 while any fails.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from teegate.addons.attestation import AttestationSync
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.ledgerlink import LedgerLink

NO_STORE = {"cache-control": "no-store"}


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers=NO_STORE)


class Readiness:
    def __init__(
        self, catalog: CatalogSync, attestation: AttestationSync, ledger: LedgerLink
    ) -> None:
        self._catalog = catalog
        self._attestation = attestation
        self._ledger = ledger

    async def readyz(self, _request: web.Request) -> web.Response:
        checks = {
            "catalog": self._catalog_check(),
            "attestation": self._attestation_check(),
            "ledger": await self._ledger_check(),
        }
        ready = all(c["ok"] for c in checks.values())
        body = {"status": "ready" if ready else "not_ready", "checks": checks}
        return web.json_response(body, status=200 if ready else 503, headers=NO_STORE)

    def _catalog_check(self) -> dict[str, Any]:
        catalog = self._catalog.catalog
        snap = catalog.snapshot if catalog is not None else None
        if snap is None:
            return {"ok": False, "reason": "no catalog younger than its staleness bound"}
        return {"ok": True, "age_s": round(time.time() - snap.fetched_at, 1)}

    def _attestation_check(self) -> dict[str, Any]:
        catalog = self._catalog.catalog
        snap = catalog.snapshot if catalog is not None else None
        served = self._attestation.served(snap) if snap is not None else []
        if not served:
            return {"ok": False, "verified_models": 0, "reason": "no model is verified now"}
        return {"ok": True, "verified_models": len(served)}

    async def _ledger_check(self) -> dict[str, Any]:
        ledger = self._ledger.ledger
        if ledger is None or not await ledger.writable():
            return {"ok": False, "reason": "the ledger cannot commit a write"}
        return {"ok": True}
