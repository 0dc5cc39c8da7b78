"""Refuse requests that carry trailer fields.

No OpenAI endpoint reads trailers, and what goes upstream is rebuilt from allow-lists,
so a trailer is never forwarded; a client that sends one gets a 400 rather than having
fields silently dropped. (mitmproxy 12 crashed on HTTP/1 trailers: teegate/master.py puts
them on the request instead.) Body size and decoding limits live elsewhere: mitmproxy's
``body_size_limit`` (teegate/runner.py) and addons/validate.py.
"""

from __future__ import annotations

from mitmproxy import http

from addons.errors import GatewayError, guarded, refuse


class Trailers:
    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.request.trailers:
            refuse(
                flow,
                GatewayError(
                    400,
                    "Trailer fields are not supported: send the request without them.",
                    "unsupported_trailers",
                    param="trailers",
                ),
            )
