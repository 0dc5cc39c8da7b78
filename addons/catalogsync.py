"""Keeps the confidential catalog fresh in the background.

The gate never fetches on the request path: it reads whatever snapshot this
addon last stored, and the snapshot expires by itself at the staleness bound.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from teegate.addons.errors import GatewayError
from teegate.catalog.store import Catalog, CatalogUnavailable, Snapshot
from teegate.catalog.upstream import UpstreamCatalogClient

if TYPE_CHECKING:
    from teegate.config import CatalogSettings, UpstreamSettings

log = structlog.get_logger("teegate.catalog")


FIRST_LOAD_WAIT_S = 5.0


def catalog_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "The confidential model catalog is unavailable or stale; refusing rather than "
        "trusting an old list. Retry shortly.",
        "catalog_unavailable",
        type="api_error",
    )


class CatalogSync:
    def __init__(self, settings: CatalogSettings, upstream: UpstreamSettings) -> None:
        self._settings = settings
        self._upstream = upstream
        self.catalog: Catalog | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: UpstreamCatalogClient | None = None

    async def running(self) -> None:
        up = self._upstream
        self._client = UpstreamCatalogClient(up.origin, up.resolved_api_key(), verify=up.verify)
        self.catalog = Catalog(
            self._client,
            markup=self._settings.markup,
            max_staleness_s=self._settings.max_staleness_s,
        )
        self._task = asyncio.create_task(self._poll(self._settings.refresh_interval_s))

    def current(self) -> Snapshot:
        """The fresh snapshot, or a ``503 catalog_unavailable`` refusal to raise."""
        try:
            if self.catalog is None:
                raise CatalogUnavailable
            return self.catalog.current()
        except CatalogUnavailable:
            raise catalog_unavailable() from None

    async def loaded(self) -> Snapshot:
        """Like :meth:`current`, but waits (bounded) for the very first catalog."""
        if self.catalog is not None and self.catalog.snapshot is None:
            await self.catalog.ensure_loaded(FIRST_LOAD_WAIT_S)
        return self.current()

    async def done(self) -> None:
        if self._task:
            self._task.cancel()
        if self._client:
            await self._client.aclose()

    async def _poll(self, interval: int) -> None:
        assert self.catalog is not None
        while True:
            try:
                snap = await self.catalog.refresh()
                log.info("catalog_refreshed", models=len(snap.models))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("catalog_refresh_failed", error=type(e).__name__, detail=str(e))
            await asyncio.sleep(interval)
