"""Keeps the confidential catalog fresh in the background.

The gate never fetches on the request path: it reads whatever snapshot this
addon last stored, and the snapshot expires by itself at the staleness bound.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal, InvalidOperation

import structlog
from mitmproxy import ctx, exceptions
from teegate.addons.errors import GatewayError
from teegate.catalog.store import Catalog, CatalogUnavailable, Snapshot
from teegate.catalog.upstream import UpstreamCatalogClient

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
    def __init__(self) -> None:
        self.catalog: Catalog | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: UpstreamCatalogClient | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "teegate_upstream",
            str,
            "http://127.0.0.1:8000",
            "Origin of the confidential upstream (scheme://host:port).",
        )
        loader.add_option(
            "teegate_upstream_key",
            str,
            "",
            "API key the gateway presents upstream; clients never see it.",
        )
        loader.add_option(
            "teegate_catalog_refresh_s",
            int,
            60,
            "Seconds between polls of the upstream's model list.",
        )
        loader.add_option(
            "teegate_catalog_max_staleness_s",
            int,
            300,
            "Refuse every model once the last good catalog is older than this.",
        )
        loader.add_option(
            "teegate_markup",
            str,
            "1.85",
            "Factor applied to upstream prices (a decimal string).",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "teegate_markup" in updated:
            try:
                markup = Decimal(opts.teegate_markup)
            except InvalidOperation:
                raise exceptions.OptionsError("teegate_markup must be a decimal string") from None
            if not markup.is_finite() or markup <= 0:
                raise exceptions.OptionsError("teegate_markup must be positive")
        if opts.teegate_catalog_refresh_s < 1 or opts.teegate_catalog_max_staleness_s < 1:
            raise exceptions.OptionsError("catalog intervals must be at least one second")

    async def running(self) -> None:
        opts = ctx.options
        verify: str | bool = opts.ssl_verify_upstream_trusted_ca or True
        self._client = UpstreamCatalogClient(
            opts.teegate_upstream, opts.teegate_upstream_key, verify=verify
        )
        self.catalog = Catalog(
            self._client,
            markup=Decimal(opts.teegate_markup),
            max_staleness_s=opts.teegate_catalog_max_staleness_s,
        )
        self._task = asyncio.create_task(self._poll(opts.teegate_catalog_refresh_s))

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
