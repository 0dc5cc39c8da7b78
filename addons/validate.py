"""Parse and validate the chat completion body; apply the API's defaults.

The body arrives bounded (mitmproxy's ``body_size_limit``, set from ``[limits]``), but a
``Content-Encoding`` body could still inflate a few KiB into gigabytes, and mitmproxy's own
decoding (``get_content``) inflates whole. It is undone here with decoders that stop at the
same limit. Brotli and zstd are refused: their decoders hold a window of up to 16 MiB
(more for zstd) whatever the limit, and OpenAI clients do not compress requests anyway.
"""

from __future__ import annotations

import zlib

from mitmproxy import ctx, exceptions, http
from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, guarded, refuse
from teegate.addons.flowstate import Stage
from teegate.addons.jsonbody import MAX_JSON_DEPTH
from teegate.addons.schema import parse_chat_request

MAX_BODY_BYTES = 16 * 1024 * 1024  # [limits] max_body_bytes's default (teegate/config.py)
_PIECE = 256 * 1024


class ChatValidator:
    def __init__(
        self,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_json_depth: int = MAX_JSON_DEPTH,
        extra_fields: frozenset[str] = frozenset(),
    ) -> None:
        self._max_body = max_body_bytes
        self._max_depth = max_json_depth
        self._extra_fields = extra_fields  # [request] extra_fields, checked by the config

    def load(self, loader) -> None:
        loader.add_option(
            "teegate_default_max_tokens",
            int,
            1024,
            "max_tokens applied when a request sets neither max_tokens nor max_completion_tokens.",
        )
        loader.add_option(
            "teegate_default_temperature",
            str,
            "0.7",
            "temperature applied when a request leaves it out.",
        )
        loader.add_option(
            "teegate_default_top_p", str, "1", "top_p applied when a request leaves it out."
        )

    def configure(self, updated: set[str]) -> None:
        try:
            t = float(ctx.options.teegate_default_temperature)
            p = float(ctx.options.teegate_default_top_p)
        except ValueError:
            raise exceptions.OptionsError("default temperature/top_p must be numbers") from None
        if not (0 <= t <= 2 and 0 <= p <= 1 and ctx.options.teegate_default_max_tokens >= 1):
            raise exceptions.OptionsError("request defaults out of range")
        self._defaults = {
            "max_tokens": ctx.options.teegate_default_max_tokens,
            "temperature": t,
            "top_p": p,
        }

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
