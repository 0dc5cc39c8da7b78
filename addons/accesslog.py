"""Request ids and one access-log line per request.

:class:`RequestIds` names each request first in the chain (every refusal carries its id);
:class:`AccessLog` writes the line last, once every response-side hook ran, so it describes
what the client was actually sent: a later hook that fails closed
(:mod:`teegate.addons.response_guard`) replaces an upstream's 200 with a 502 envelope, and
:class:`~teegate.addons.responses.ResponsesOut` translates a chat answer into the Responses
body the client receives.

The line carries metadata only (id, method, path, model, status, timings,
sizes): never a prompt, a completion or a key. mitmproxy's error text quotes the
bytes it choked on, so only its category is logged; the model only when the catalog lists
it ("unlisted" otherwise); the strings a client chose that are logged (method, path) are cut
and escaped on the way out (teegate/logs.py).
"""

from __future__ import annotations

import secrets
import time

import structlog
from mitmproxy import connection, http

from teegate.addons import flowstate
from teegate.addons.error_pages import page_code
from teegate.addons.errors import error_category
from teegate.addons.flowstate import FailedClosed, Route
from teegate.addons.headers import add_headers
from teegate.addons.response_guard import guarded_response
from teegate.addons.routes import RESPONSES_PATH

log = structlog.get_logger("teegate.access")

# mitmproxy calls the forward-proxy listener "regular"; teegate's documentation, settings
# (`[listen] egress`) and every line it prints call it egress, so a reader meets one name.
_MODES = {"regular": "egress"}

HEAD_TOO_LARGE = page_code(431)  # the code of the page a head over 64 KiB gets


def listener_name(mode_type_name: str) -> str:
    """teegate's name for a mitmproxy listener mode: ``egress`` for ``regular``."""
    return _MODES.get(mode_type_name, mode_type_name)


class RequestIds:
    """Gives every request its id before any addon may answer it."""

    def request(self, flow: http.HTTPFlow) -> None:
        rid = "req_" + secrets.token_hex(12)
        flowstate.set_request_id(flow, rid)
        add_headers(flow, {"x-request-id": rid})


class AccessLog:
    """The request's one line, written after every other response-side hook (but Drain)."""

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    @guarded_response
    def error(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def request_head_too_large(self, client: connection.Client) -> None:
        """A head refused with 431 before any flow existed (teegate/master.py): the same line,
        with what is known of it (no id, method or path: only the client sent those)."""
        log.info(
            "request",
            request_id=None,
            mode=listener_name(client.proxy_mode.type_name),
            decision="refused",
            status=431,
            error_code=HEAD_TOO_LARGE,
        )

    def _log(self, flow: http.HTTPFlow) -> None:
        req, resp = flow.request, flow.response
        upstream_ms = None
        if resp is not None and flow.server_conn.timestamp_start and req.timestamp_end:
            upstream_ms = round((resp.timestamp_start - req.timestamp_end) * 1000, 1)
        log.info(
            "request",
            request_id=flowstate.request_id(flow),
            mode=listener_name(flow.client_conn.proxy_mode.type_name),
            host=f"{req.host}:{req.port}",
            decision=decision(flow),
            method=req.method,
            path=RESPONSES_PATH if flowstate.responses_call(flow) else req.path.split("?", 1)[0],
            model=_model(flow),
            status=flowstate.sent_status(flow),
            error_code=flowstate.error_code(flow),
            error=_error(flow),
            upstream_ms=upstream_ms,
            total_ms=round((time.time() - req.timestamp_start) * 1000, 1),
            bytes_in=len(req.raw_content or b""),
            bytes_out=_bytes_out(flow),
        )


def _bytes_out(flow: http.HTTPFlow) -> int | None:
    """The body bytes sent to the client: a relayed stream's as its tally counted them (its
    body is not kept), else the final body's (a Responses call's: the translated answer; a
    withheld answer's: the error envelope that replaced it)."""
    tally = flowstate.stream_tally(flow)
    failed = flowstate.failed_closed(flow)
    if tally is not None and (failed is None or failed[0] != FailedClosed.WITHHELD):
        return tally.relayed_bytes
    resp = flow.response
    if resp is None or resp.raw_content is None:
        return None
    return len(resp.raw_content)


def _error(flow: http.HTTPFlow) -> str | None:
    if flow.error is None:
        return None
    category = error_category(flow.error.msg)
    if category == "upstream_disconnected" and not flow.request.timestamp_end:
        return "client_disconnected"  # the same words, but the request never arrived whole
    return category


def _model(flow: http.HTTPFlow) -> str | None:
    """The model id when the catalog lists it; any other string a client sent as a model
    is its text, which may be anything (a prompt pasted by mistake), so it is not logged."""
    if not flowstate.has_chat_request(flow):
        return None
    listed = flowstate.listed_model(flow)
    return "unlisted" if listed is None else listed


def decision(flow: http.HTTPFlow) -> str | None:
    """What the gateway did with the request: refused, answered locally, forwarded to the
    confidential upstream, or (egress) passed on untouched / in audit."""
    if flowstate.error_code(flow):
        return "refused"
    route = flowstate.route(flow)
    if route == Route.PASSTHROUGH:
        return "audit" if flowstate.egress_verdict(flow) == "audit" else "passthrough"
    return {Route.CHAT: "forwarded", Route.LOCAL: "local"}.get(route)
