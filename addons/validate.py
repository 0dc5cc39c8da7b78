"""Parse and validate the chat completion body; apply the API's defaults.

The body arrives bounded (mitmproxy's ``body_size_limit``, set from ``[limits]``), but a
``Content-Encoding`` body could still inflate a few KiB into gigabytes, and mitmproxy's own
decoding (``get_content``) inflates whole. It is undone here with decoders that stop at the
same limit. Brotli and zstd are refused: their decoders hold a window of up to 16 MiB
(more for zstd) whatever the limit, and OpenAI clients do not compress requests anyway.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, guarded, refuse
from teegate.addons.flowstate import Stage
from teegate.addons.schema import parse_chat_request

if TYPE_CHECKING:
    from teegate.config import LimitSettings, RequestDefaults, RequestSettings

_PIECE = 256 * 1024


class ChatValidator:
    def __init__(
        self, defaults: RequestDefaults, request: RequestSettings, limits: LimitSettings
    ) -> None:
        self._defaults = {
            "max_tokens": defaults.max_tokens,
            "temperature": defaults.temperature,
            "top_p": defaults.top_p,
        }
        self._extra_fields = request.allowed_extra
        self._max_body = limits.max_body_bytes
        self._max_depth = limits.max_json_depth

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        if not flowstate.is_chat(flow):
            return
        try:
            raw = decoded_body(flow.request, self._max_body)
            req = parse_chat_request(
                raw, **self._defaults, max_depth=self._max_depth, extra_fields=self._extra_fields
            )
        except GatewayError as e:
            refuse(flow, e)
            return
        flowstate.set_chat_request(flow, req)
        flowstate.passed(flow, Stage.VALIDATE)


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than {limit} bytes.", "request_too_large")


def decoded_body(request: http.Request, limit: int) -> bytes:
    """The body with its ``Content-Encoding`` undone, never inflating past ``limit`` bytes."""
    raw = request.raw_content or b""
    if len(raw) > limit:
        raise too_large(limit)
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding in ("", "identity"):
        return raw
    try:
        if coding in ("gzip", "x-gzip"):
            return _inflate(raw, 16 + zlib.MAX_WBITS, limit)
        if coding == "deflate":  # zlib-wrapped as the RFC says, or raw as some clients send
            try:
                return _inflate(raw, zlib.MAX_WBITS, limit)
            except zlib.error:
                return _inflate(raw, -zlib.MAX_WBITS, limit)
    except (zlib.error, _Truncated):
        raise GatewayError(
            400,
            f"The request body could not be decoded as {coding}.",
            "invalid_body",
            param="content-encoding",
        ) from None
    raise GatewayError(
        415,
        "Unsupported Content-Encoding: send the body as identity, gzip or deflate.",
        "unsupported_content_encoding",
        param="content-encoding",
    )


class _Truncated(Exception):
    pass


def _inflate(raw: bytes, wbits: int, limit: int) -> bytes:
    """Inflate once to measure (one piece held at a time), then again to keep, if it fits.

    A bomb is refused having held one piece; only a body that fits is ever held whole.
    """
    d = zlib.decompressobj(wbits)
    size, data = 0, raw
    while True:
        size += len(piece := d.decompress(data, _PIECE))
        if size > limit:
            raise too_large(limit)
        data = d.unconsumed_tail
        if d.eof or not (data or len(piece) == _PIECE):  # done, or the input is used up
            break
    if not d.eof or d.unused_data:  # cut short, or bytes after the end (a second member)
        raise _Truncated
    return zlib.decompress(raw, wbits, bufsize=max(size, 1))
