"""Refuse requests with trailers or odd header fields; let go of large bodies once done.

Header fields (``HeaderFields``): mitmproxy accepts what RFC 9112 tells a server to refuse or
repair (a NUL or other control byte in a field, an obsolete line folding, which it keeps as
``"\\r\\n "`` inside the value), any number of fields, and transfer codings besides
``chunked`` that it does not undo (``gzip, chunked`` reaches the addons still gzipped). Nothing
of a client's headers goes upstream (addons/upstream.py builds them), but a request whose
framing or fields two parsers could read differently is refused rather than guessed at: 400,
or 431 past :data:`MAX_HEADER_FIELDS`. The header section's size is bounded before it is
buffered (teegate/master.py). Egress flows to hosts the gateway does not intercept are the
client's own traffic and are not judged here.

No OpenAI endpoint reads trailers, and what goes upstream is rebuilt from allow-lists,
so a trailer is never forwarded; a client that sends one gets a 400 rather than having
fields silently dropped. (mitmproxy 12 crashed on HTTP/1 trailers: teegate/master.py puts
them on the request instead.) Body size and decoding limits live elsewhere: mitmproxy's
``body_size_limit`` (teegate/runner.py) and addons/validate.py.

mitmproxy's per-request state (``HttpStream``) keeps bound methods of itself, a reference
cycle: it and the flow it holds (body included) are freed only by a full garbage collection,
which comes every several requests, so peak memory grew with each large body in a row; a
collection soon after a flow that held a large body keeps the peak at a small multiple of the
limit (tests/gateway/test_limits.py holds it there; docs/bench.md has the numbers).
A collection walks only what requests created (teegate/master.py freezes the rest): ~ms.
"""

from __future__ import annotations

import asyncio
import gc
from typing import TYPE_CHECKING

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, guarded, refuse
from teegate.addons.flowstate import Route
from teegate.addons.response_guard import guarded_response

if TYPE_CHECKING:
    from teegate.config import LimitSettings

MAX_HEADER_FIELDS = 100
_CONTROL = bytes(sorted(frozenset(range(0x20)) - {0x09} | {0x7F}))


def _bad_field(headers: http.Headers) -> str | None:
    """The name of the first field with a control byte in its name or value (a NUL, a CR or
    LF of an obsolete line folding); never its value."""
    for name, value in headers.fields:
        # Runs on every request: translate() deletes the control bytes in C, rather than a
        # Python loop over every byte; a field that shrinks held one.
        if len(name.translate(None, _CONTROL)) < len(name) or (
            len(value.translate(None, _CONTROL)) < len(value)
        ):
            return name.decode("ascii", "replace")[:64]
    return None


class HeaderFields:
    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flowstate.route(flow) == Route.PASSTHROUGH:
            return
        headers = flow.request.headers
        if len(headers.fields) > MAX_HEADER_FIELDS:
            refuse(
                flow,
                GatewayError(
                    431,
                    f"The request has more than {MAX_HEADER_FIELDS} header fields.",
                    "request_header_fields_too_large",
                ),
            )
        elif (name := _bad_field(headers)) is not None:
            refuse(
                flow,
                GatewayError(
                    400,
                    "A header field holds a control character or an obsolete line folding.",
                    "invalid_header",
                    param=name,
                ),
            )
        elif "transfer-encoding" in headers and [
            c.strip().lower() for c in ",".join(headers.get_all("transfer-encoding")).split(",")
        ] != ["chunked"]:
            refuse(
                flow,
                GatewayError(
                    400,
                    "Unsupported Transfer-Encoding: only chunked is accepted.",
                    "unsupported_transfer_encoding",
                    param="transfer-encoding",
                ),
            )


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


LARGE_BODY = 1024 * 1024  # or the body limit, if lower: what counts as large enough to collect
COLLECT_AFTER_S = 0.05  # once mitmproxy has answered and dropped the flow's state


class ReleaseLargeBodies:
    def __init__(self, limits: LimitSettings) -> None:
        self._large = min(limits.max_body_bytes, LARGE_BODY)
        self._pending: asyncio.TimerHandle | None = None

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        self._after(flow)

    @guarded_response
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
