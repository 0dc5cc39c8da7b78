"""A deadline for the upstream's answer, and JSON error pages when it fails.

mitmproxy has no timeout for an upstream that accepts a request and then says
nothing. This addon starts a timer when a chat completion leaves; if no
response headers arrive in time it closes the upstream connection, and the
client gets ``504 upstream_timeout`` instead of waiting forever. For any
upstream failure it picks the JSON envelope of the error page mitmproxy then
writes (``502 upstream_unreachable`` otherwise).

A timed-out request was sent and may have run: :mod:`teegate.addons.billing` settles
it at its reservation (``billing.unanswered``, default "hold"), reading
``TIMED_OUT`` only to name the reason.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from mitmproxy import ctx, http
from teegate.addons.errors import GatewayError, next_error_page

if TYPE_CHECKING:
    from teegate.config import UpstreamSettings

log = structlog.get_logger("teegate")

TIMER = "teegate.deadline"
TIMED_OUT = "teegate.timed_out"


class UpstreamDeadline:
    def __init__(self, upstream: UpstreamSettings) -> None:
        self._timeout_s = upstream.timeout_s

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.metadata.get("teegate.route") != "chat":
            return
        loop = asyncio.get_running_loop()
        flow.metadata[TIMER] = loop.call_later(self._timeout_s, self._expire, flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        _cancel(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        _cancel(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        _cancel(flow)
        if flow.response is not None or flow.metadata.get("teegate.route") != "chat":
            return
        if flow.metadata.get(TIMED_OUT):
            err = GatewayError(
                504,
                "The confidential upstream did not answer in time; the request was abandoned.",
                "upstream_timeout",
                type="api_error",
            )
        else:
            err = GatewayError(
                502,
                "The confidential upstream could not be reached or broke off the answer.",
                "upstream_unreachable",
                type="api_error",
            )
        flow.metadata["teegate.error_code"] = err.code
        next_error_page.set(err)

    def _expire(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not flow.live:
            return
        flow.metadata[TIMED_OUT] = True
        log.warning("upstream_timeout", request_id=flow.metadata.get("teegate.request_id"))
        handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
        if handler is not None and flow.server_conn in handler.transports:
            handler.close_connection(flow.server_conn)


def _cancel(flow: http.HTTPFlow) -> None:
    timer = flow.metadata.pop(TIMER, None)
    if timer is not None:
        timer.cancel()
