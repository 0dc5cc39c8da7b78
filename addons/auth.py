"""API keys: every ``/v1/*`` call carries ``Authorization: Bearer <key>``.

A missing, malformed, unknown or revoked key gets OpenAI's 401
``invalid_api_key`` envelope; a key the ledger cannot look up (its database is
down) a retryable ``503 billing_unavailable``. The presented key is never logged or echoed:
not in the error message, not in the access log.
"""

from __future__ import annotations

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, billing_unavailable, guarded, refuse
from teegate.addons.flowstate import Route, Stage
from teegate.addons.ledgerlink import LedgerLink
from teegate.ledger import LedgerError


def invalid_api_key(message: str) -> GatewayError:
    return GatewayError(401, message, "invalid_api_key", type="invalid_request_error")


def needs_key(flow: http.HTTPFlow) -> bool:
    if flow.response is not None or flowstate.route(flow) == Route.PASSTHROUGH:
        return False
    return flow.request.path.startswith("/v1/")


class Auth:
    def __init__(self, link: LedgerLink) -> None:
        self._link = link

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if not needs_key(flow):
            return
        scheme, _, token = flow.request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            refuse(
                flow,
                invalid_api_key(
                    "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
                ),
            )
            return
        try:
            key = await self._link.get().authenticate(token)
        except LedgerError:  # the database is down: cannot tell, so refuse (retryable)
            refuse(flow, billing_unavailable())
            return
        if key is None:
            refuse(flow, invalid_api_key("Incorrect API key provided, or the key was revoked."))
            return
        flowstate.set_api_key(flow, key)
        flowstate.passed(flow, Stage.AUTH)
