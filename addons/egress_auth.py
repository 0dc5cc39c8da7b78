"""Proxy authentication on the egress listener: only holders of a gateway key may use it.

Why: the egress listener tunnels every host that is not an LLM API untouched. Reachable
from a network without authentication it is an open proxy for anyone who finds it. With
``egress.proxy_auth = "api_key"`` a client presents one of the gateway's API keys as the
password of its HTTP Basic proxy credentials (``HTTPS_PROXY=http://any-name:<key>@host:8081``,
which every HTTP client understands): checked on ``CONNECT``, once per connection, and on
each request proxied in plain HTTP. Otherwise ``407 proxy_authentication_required`` with
``Proxy-Authenticate`` is the answer, and nothing is connected. The key is checked like a
bearer key (hash lookup, revocation), stripped before anything is forwarded, never logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import connection, http
from mitmproxy.addons.proxyauth import parse_http_basic_auth

from teegate.addons.egress import is_egress
from teegate.addons.errors import GatewayError, guarded, refuse
from teegate.addons.ledgerlink import LedgerLink

if TYPE_CHECKING:
    from teegate.config import EgressSettings

REALM = 'Basic realm="teegate egress"'


def proxy_authentication_required() -> GatewayError:
    return GatewayError(
        407,
        "This proxy needs credentials: a gateway API key as the password of the proxy URL "
        "(HTTPS_PROXY=http://user:<key>@host:port).",
        "proxy_authentication_required",
        type="invalid_request_error",
        headers={"proxy-authenticate": REALM},
    )


class EgressAuth:
    def __init__(self, link: LedgerLink, egress: EgressSettings) -> None:
        self._link = link
        self._on = egress.proxy_auth == "api_key"
        self._authenticated: set[str] = set()  # client connection ids that passed CONNECT

    @guarded
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if self._required(flow) and await self._check(flow):
            self._authenticated.add(flow.client_conn.id)

    @guarded
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._required(flow) or flow.client_conn.id in self._authenticated:
            return
        await self._check(flow)

    def client_disconnected(self, client: connection.Client) -> None:
        self._authenticated.discard(client.id)

    def _required(self, flow: http.HTTPFlow) -> bool:
        return (
            self._on and flow.response is None and is_egress(flow.client_conn.proxy_mode.type_name)
        )

    async def _check(self, flow: http.HTTPFlow) -> bool:
        presented = flow.request.headers.pop("proxy-authorization", "")
        try:
            _, _, key = parse_http_basic_auth(presented)
        except ValueError:
            key = ""
        if key and await self._link.get().authenticate(key) is not None:
            return True
        refuse(flow, proxy_authentication_required())
        return False
