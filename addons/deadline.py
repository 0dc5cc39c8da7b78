"""A deadline for the upstream's answer, and JSON error pages when it fails.

mitmproxy has no timeout for an upstream that accepts a request and then says
nothing, nor for a connect nobody answers (a blackholed route, a full accept
queue: the kernel retries the SYN for ~2 minutes). This addon starts a timer when
a chat completion leaves; if no response headers arrive in time it closes the
upstream connection, or cancels the connect still under way, and the client gets
``504 upstream_timeout`` instead of waiting. For any
upstream failure it picks the JSON envelope of the error page mitmproxy then
writes (``502 upstream_unreachable`` otherwise).

A timed-out request was sent and may have run: :mod:`teegate.addons.billing` settles
it at its reservation (``billing.unanswered``, default "hold"), reading
:func:`~teegate.addons.flowstate.timed_out` only to name the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog
from mitmproxy import ctx, http
from mitmproxy.connection import Server

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
        rid = flowstate.request_id(flow)
        headers = {"x-request-id": rid} if rid else None  # as on every other answer
        if flowstate.timed_out(flow):
            err = GatewayError(
                504,
                "The confidential upstream did not answer in time; the request was abandoned.",
                "upstream_timeout",
                type="api_error",
                headers=headers,
            )
        else:
            err = GatewayError(
                502,
                "The confidential upstream could not be reached or broke off the answer.",
                "upstream_unreachable",
                type="api_error",
                headers=headers,
            )
        flowstate.set_error_code(flow, err.code)
        flowstate.set_error_page_status(flow, err.status)  # the log and metrics run after us
        next_error_page.set(err)

    def _expire(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not flow.live:
            return
        flowstate.set_timed_out(flow)
        log.warning("upstream_timeout", request_id=flowstate.request_id(flow))
        handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
        if handler is None:
            return
        for conn in _upstream_connections(flow, handler.transports):
            handler.close_connection(conn)


def _upstream_connections(flow: http.HTTPFlow, transports: Iterable[Any]) -> list[Server]:
    """The server connection a timed-out flow waits on, to be closed.

    mitmproxy gives the flow its server connection only once it is set up (TCP connected,
    TLS done); until then the flow holds a placeholder and the connection being opened is
    known only to the client connection's handler. Closing that one cancels its connect: an
    upstream that never answers the SYN (or the TLS hello) is cut by the deadline like one
    that never answers the request, not after the kernel's ~2 minutes of SYN retries. A
    connection already set up to the same address (another request's, kept alive) is left
    alone; requests of this client connection waiting on the same pending connect fail
    with it, as they would at the kernel's give-up.
    """
    if flow.server_conn in transports:
        return [flow.server_conn]
    address = (flow.request.host, flow.request.port)
    return [
        conn
        for conn in transports
        if isinstance(conn, Server) and conn.address == address and _still_connecting(conn)
    ]


def _still_connecting(conn: Server) -> bool:
    if conn.timestamp_tcp_setup is None:
        return True
    return bool(conn.tls) and conn.timestamp_tls_setup is None


def _cancel(flow: http.HTTPFlow) -> None:
    timer = flowstate.pop_deadline(flow)
    if timer is not None:
        timer.cancel()
