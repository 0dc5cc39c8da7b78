"""Refuse requests that carry trailer fields; let go of large bodies once a flow is done.

No OpenAI endpoint reads trailers, and what goes upstream is rebuilt from allow-lists,
so a trailer is never forwarded; a client that sends one gets a 400 rather than having
fields silently dropped. (mitmproxy 12 crashed on HTTP/1 trailers: teegate/master.py puts
them on the request instead.) Body size and decoding limits live elsewhere: mitmproxy's
``body_size_limit`` (teegate/runner.py) and addons/validate.py.

mitmproxy's per-request state (``HttpStream``) keeps bound methods of itself, a reference
cycle: it and the flow it holds (body included) are freed only by a full garbage collection,
which comes every several requests. Measured with a 2 MiB limit, four 2 MiB requests in a row
raised peak RSS by ~20 MiB, growing with each; a collection soon after a flow that held a
large body keeps the peak at a small multiple of the limit (tests/gateway/test_limits.py).
A collection walks only what requests created (teegate/master.py freezes the rest): ~ms.
"""

from __future__ import annotations

import asyncio
import gc

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


LARGE_BODY = 1024 * 1024
COLLECT_AFTER_S = 0.05  # once mitmproxy has answered and dropped the flow's state


class ReleaseLargeBodies:
    def __init__(self, large: int = LARGE_BODY) -> None:
        self._large = large
        self._pending: asyncio.TimerHandle | None = None

    def response(self, flow: http.HTTPFlow) -> None:
        self._after(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._after(flow)

    def _after(self, flow: http.HTTPFlow) -> None:
        held = len(flow.request.raw_content or b"")
        cut = flow.error is not None and "body_size_limit" in flow.error.msg
        if (held >= self._large or cut) and self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(COLLECT_AFTER_S, self._collect)

    def _collect(self) -> None:
        self._pending = None
        gc.collect()
