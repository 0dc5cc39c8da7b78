"""The cached catalog the gate reads.

The snapshot lives in a one-entry :class:`cachetools.TTLCache` whose TTL is the
staleness bound: once the last good refresh is older than that, the snapshot
is simply gone and every lookup fails closed with ``catalog_unavailable``.
Refreshes are single-flight: concurrent callers await the same task.
"""

from __future__ import annotations

import asyncio
import difflib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

import cachetools
import structlog

from teegate.catalog.models import CatalogModel, parse_rows

log = structlog.get_logger("teegate.catalog")


class RowSource(Protocol):
    async def fetch_rows(self) -> list: ...


class CatalogUnavailable(Exception):
    """No catalog younger than the staleness bound: refuse everything."""


@dataclass(frozen=True)
class Snapshot:
    models: dict[str, CatalogModel]
    non_confidential: frozenset[str]  # listed upstream, but without the flag
    fetched_at: float  # wall-clock seconds, for reporting only


class Catalog:
    """Confidential models by exact id, refreshed from an upstream source."""

    def __init__(
        self,
        source: RowSource,
        *,
        markup: Decimal,
        max_staleness_s: float,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._markup = markup
        self._cache: cachetools.TTLCache[str, Snapshot] = cachetools.TTLCache(
            maxsize=1, ttl=max_staleness_s, timer=timer
        )
        self._inflight: asyncio.Task[Snapshot] | None = None
        self._listeners: list[Callable[[Iterable[str]], None]] = []

    def on_change(self, listener: Callable[[Iterable[str]], None]) -> None:
        """Call ``listener(model_ids)`` after every successful refresh."""
        self._listeners.append(listener)

    @property
    def snapshot(self) -> Snapshot | None:
        return self._cache.get("snapshot")

    def current(self) -> Snapshot:
        """The fresh snapshot, or CatalogUnavailable when stale or never loaded."""
        snap = self.snapshot
        if snap is None:
            raise CatalogUnavailable("the confidential model catalog is stale or not loaded yet")
        return snap

    def models(self) -> dict[str, CatalogModel]:
        return self.current().models

    def get(self, model_id: str) -> CatalogModel | None:
        """Exact, case-sensitive lookup. Raises CatalogUnavailable when stale."""
        return self.models().get(model_id)

    async def refresh(self) -> Snapshot:
        """Fetch and replace the snapshot; concurrent callers share one fetch."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._inflight)

    async def _refresh(self) -> Snapshot:
        rows = await self._source.fetch_rows()
        models, others, skipped = parse_rows(rows, self._markup)
        for reason in skipped:
            log.warning("catalog_row_skipped", reason=reason)
        snap = Snapshot(models=models, non_confidential=others, fetched_at=time.time())
        self._cache["snapshot"] = snap
        for listener in self._listeners:
            listener(models.keys())
        return snap

    async def ensure_loaded(self, within_s: float) -> None:
        """Wait (bounded) for a first snapshot; used before the first request is judged."""
        if self.snapshot is not None:
            return
        try:
            async with asyncio.timeout(within_s):
                await self.refresh()
        except Exception as e:  # any failure: the caller sees CatalogUnavailable
            log.warning("catalog_refresh_failed", error=type(e).__name__, detail=str(e))


def suggest(requested: str, confidential_ids: Iterable[str]) -> str | None:
    """The confidential id a user most plausibly meant, or None.

    Order of preference: ``<id>-TEE``; an id extending the request with a
    ``-`` variant suffix (``DeepSeek-V3`` -> ``DeepSeek-V3-0324-TEE``, the
    shortest such); a case-insensitive match; then a close fuzzy match.
    """
    ids = sorted(confidential_ids)
    if f"{requested}-TEE" in ids:
        return f"{requested}-TEE"
    extending = [i for i in ids if i.startswith(requested + "-")]
    if extending:
        return min(extending, key=len)
    lowered = {i.lower(): i for i in ids}
    for candidate in (requested.lower(), requested.lower() + "-tee"):
        if candidate in lowered:
            return lowered[candidate]
    close = difflib.get_close_matches(requested.lower(), list(lowered), n=1, cutoff=0.8)
    return lowered[close[0]] if close else None
