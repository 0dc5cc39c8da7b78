"""The last addon on the request path: forward only what every stage approved.

mitmproxy forwards a request whose addon raised. This addon closes that gap
for everything before it: a chat completion goes upstream only if each
required stage recorded its approval; any other flow without a local answer
is refused. It cannot raise past its own guard.
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import http
from teegate.addons.stages import STAGES

_FALLBACK = http.Response.make(
    500,
    b'{"error":{"message":"The gateway refused to forward an unapproved request.",'
    b'"type":"api_error","param":null,"code":"internal_error"},"status":500}',
    {"content-type": "application/json"},
)


class Seal:
    def __init__(self, required: Iterable[str]) -> None:
        self.required = frozenset(required)

    def request(self, flow: http.HTTPFlow) -> None:
        try:
            if flow.response is not None:
                return
            route = flow.metadata.get("teegate.route")
            if route == "passthrough" and flow.client_conn.proxy_mode.type_name == "regular":
                return  # egress: a host we do not intercept, decided by the egress addon
            if route == "chat" and self.required <= flow.metadata.get(STAGES, set()):
                return
        except Exception:
            pass
        flow.response = _FALLBACK.copy()
        flow.metadata["teegate.error_code"] = "internal_error"
