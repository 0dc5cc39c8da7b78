"""The last word on whether a request leaves: forward only what every stage approved.

mitmproxy forwards a request whose addon raised. This addon closes that gap
for everything before it in the chain (the addons after it only arm the upstream
deadline and handle responses; none decides whether a request leaves): a chat
completion goes upstream only if each required stage recorded its approval; any
other flow without a local answer is refused. It cannot raise past its own guard.
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.flowstate import Route, Stage

_FALLBACK = http.Response.make(
    500,
    b'{"error":{"message":"The gateway refused to forward an unapproved request.",'
    b'"type":"api_error","param":null,"code":"internal_error","status":500},"status":500}',
    {"content-type": "application/json", "x-should-retry": "false"},
)


class Seal:
    def __init__(self, required: Iterable[Stage]) -> None:
        self.required = frozenset(map(Stage, required))  # a misspelt stage fails at start

    def request(self, flow: http.HTTPFlow) -> None:
        try:
            if flow.response is not None:
                return
            route = flowstate.route(flow)
            if route == Route.PASSTHROUGH and flow.client_conn.proxy_mode.type_name == "regular":
                return  # egress: a host we do not intercept, decided by the egress addon
            if route == Route.CHAT and self.required <= flowstate.approvals(flow):
                return
        except Exception:
            pass
        flow.response = _FALLBACK.copy()
        flowstate.set_error_code(flow, "internal_error")
