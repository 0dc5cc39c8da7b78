"""A graceful stop: stop accepting, let the requests in flight finish, for a bounded time.

A stream is a minute-long answer the client has already been charged a reservation for;
cutting it at every deploy or worker replacement would turn each restart into a burst of
broken answers (and, with ``billing.unanswered = "hold"``, full charges). On the first
SIGTERM/SIGINT the gateway closes its listeners (with several workers on one port the kernel
sends new connections to the others), waits until every request in flight has its response
finished or failed, at most ``workers.drain_s`` seconds, and then shuts down. A second signal
stops at once.

"In flight" is counted per HTTP request, from its headers to its ``response``/``error`` hook
(which, for a streamed body, runs after the last chunk), not per connection: idle keep-alive
connections do not hold the stop back.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from mitmproxy import ctx, http

from teegate.addons.response_guard import guarded_response

log = structlog.get_logger("teegate.drain")


class Drain:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._in_flight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._in_flight.add(flow.id)
        self._idle.clear()

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    @guarded_response
    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)
        if not self._in_flight:
            self._idle.set()

    def stop(self) -> None:
        """The signal handler: drain on the first call, shut down at once on the next."""
        if self._task is not None:
            log.warning("drain_cut_short", in_flight=self.in_flight)
            ctx.master.shutdown()
            return
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        started = time.monotonic()
        try:
            await ctx.master.addons.get("proxyserver").servers.update([])  # stop listening
            log.info("draining", in_flight=self.in_flight, timeout_s=self.timeout_s)
            try:
                await asyncio.wait_for(self._idle.wait(), self.timeout_s)
            except TimeoutError:
                log.warning("drain_timeout", in_flight=self.in_flight, timeout_s=self.timeout_s)
            else:
                log.info("drained", seconds=round(time.monotonic() - started, 3))
        finally:
            ctx.master.shutdown()
