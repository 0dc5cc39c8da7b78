"""A deadline for the upstream's answer, and JSON error pages when it fails.

mitmproxy has no timeout for an upstream that accepts a request and then says
nothing. This addon starts a timer when a chat completion leaves; if no
response headers arrive in time it closes the upstream connection, and the
client gets ``504 upstream_timeout`` instead of waiting forever. For any
upstream failure it picks the JSON envelope of the error page mitmproxy then
writes (``502 upstream_unreachable`` otherwise).

A timed-out request was sent and may have run: :mod:`teegate.addons.billing` settles
it at its reservation (``billing.unanswered``, default "hold"), reading
:func:`~teegate.addons.flowstate.timed_out` only to name the reason.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from mitmproxy import ctx, http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, next_error_page
from teegate.addons.flowstate import Route
from teegate.addons.response_guard import guarded_response

if TYPE_CHECKING:
    from teegate.config import UpstreamSettings

log = structlog.get_logger("teegate")


class UpstreamDeadline:
    def __init__(self, upstream: UpstreamSettings) -> None:
        self._timeout_s = upstream.timeout_s

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flowstate.route(flow) != Route.CHAT:
            return
        loop = asyncio.get_running_loop()
        flowstate.set_deadline(flow, loop.call_later(self._timeout_s, self._expire, flow))

    @guarded_response
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        _cancel(flow)

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        _cancel(flow)

    @guarded_response
    def error(self, flow: http.HTTPFlow) -> None:
        _cancel(flow)
        if flow.response is not None or flowstate.route(flow) != Route.CHAT:
            return
        if flowstate.timed_out(flow):
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
        flowstate.set_error_code(flow, err.code)
        next_error_page.set(err)

    def _expire(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not flow.live:
            return
        flowstate.set_timed_out(flow)
        log.warning("upstream_timeout", request_id=flowstate.request_id(flow))
        handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
        if handler is not None and flow.server_conn in handler.transports:
            handler.close_connection(flow.server_conn)


def _cancel(flow: http.HTTPFlow) -> None:
    timer = flowstate.pop_deadline(flow)
    if timer is not None:
        timer.cancel()
