"""A worker of ``teegate run --workers N`` takes connections once it can serve them.

Its listeners are bound but held (:func:`teegate.listeners.share_port` with ``hold``) until this
addon's ``running`` hook, which runs after every other addon's (so the catalog poll and the
attestation have started), has waited for the first catalog and the first verdict of every
model in it, at most ``workers.warmup_s``. Until then the kernel gives the shared port's new
connections to the other workers. A worker that cannot warm up within the bound (upstream down,
evidence failing) listens anyway: its gates refuse what it cannot vouch for, as any worker's do.
A lone ``teegate run`` holds nothing: it answers from the start (a request waits, bounded, for
what it needs, or is refused).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from teegate.addons.attestation import AttestationSync
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.errors import GatewayError

log = structlog.get_logger("teegate.warmup")


class Warmup:
    def __init__(
        self,
        catalog: CatalogSync,
        attestation: AttestationSync,
        within_s: float,
        open_listeners: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self._catalog = catalog
        self._att = attestation
        self._within_s = within_s
        self._open = open_listeners

    async def running(self) -> None:
        if self._open is None:
            return
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._within_s):
                snap = await self._catalog.loaded()
                await self._att.first_verdicts(snap.models, self._within_s)
            log.info("warmed_up", seconds=round(time.monotonic() - started, 3))
        except (TimeoutError, GatewayError) as e:
            log.warning("warmup_incomplete", reason=type(e).__name__, within_s=self._within_s)
        finally:
            await self._open()
