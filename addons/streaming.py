"""Relay chat completion streams as they arrive, and tally what they carried.

Without ``flow.response.stream`` mitmproxy would buffer an SSE response until
the upstream closes. The relay passes each complete event on at once, records
the final ``usage`` (and, as a fallback for billing, the bytes of generated
text), and removes the usage-only chunk the gateway itself asked for when the
client did not, so the client sees exactly the stream OpenAI would send.

The answer must come from the model that was attested: the first data event
must be a chunk whose ``model`` is the requested id. mitmproxy has already sent
the response headers (``200``) to the client when the first body piece arrives
(``start_response_stream`` runs right after the ``responseheaders`` hook), so a
502 is no longer possible: on a mismatch the relay sends one SSE event carrying
the ``upstream_model_mismatch`` envelope (the OpenAI SDKs raise ``APIError`` on
an ``error`` event) instead of the chunk, relays nothing after it, and billing
releases the hold. A stream that cannot be read before that check (unknown
encoding, parse fault) fails the same way.

An end-to-end encrypted stream (a Chutes upstream, :mod:`teegate.addons.chutes`) is opened
event by event before any of this: the ``e2e_init`` event and the front door's plaintext
``usage`` events are dropped, each ``e2e`` frame becomes the plaintext event it carries, so
the model check, the usage tally and the usage stripping all read what the enclave wrote. A
frame that does not open ends the stream like a mismatch (one error event, nothing after), but
is billed by the usual rules from what was delivered before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.chutes import e2ee_failed, upstream_error
from teegate.addons.flowstate import Route
from teegate.addons.response_guard import guarded_response
from teegate.addons.sse import Event, SSESplitter
from teegate.addons.upstream import log_mismatch, model_mismatch
from teegate.catalog.chutes.e2ee import E2EEError

if TYPE_CHECKING:
    from teegate.catalog.chutes.e2ee import StreamOpener

log = structlog.get_logger("teegate")

_TEXT_KEYS = frozenset(("content", "reasoning_content", "reasoning", "refusal"))


@dataclass
class StreamTally:
    """What a stream delivered; read by billing when the flow ends, however it ends."""

    usage: dict[str, Any] | None = None
    generated_bytes: int = 0  # content, reasoning and tool-call argument bytes
    events: int = 0
    saw_done: bool = False
    complete: bool = False  # the upstream finished its body
    opaque: bool = False  # we could not read the stream (unknown encoding, parse fault)
    first_byte_at: float | None = None
    model_mismatch: bool = False  # the answer named another model: nothing of it was relayed
    e2ee_failed: bool = False  # an encrypted frame did not open: nothing after it was relayed
    extra: dict[str, Any] = field(default_factory=dict)
    received: Any = field(default_factory=hashlib.sha256)
    """SHA-256 of every (decoded) byte the upstream sent: what its response signature covers."""
    relayed: Any = field(default_factory=hashlib.sha256)
    """SHA-256 of every byte relayed to the client (differs when the usage chunk is removed, and
    for a ``/v1/responses`` call, whose client gets the chunks translated)."""
    relayed_bytes: int = 0
    translated: bool = False
    """Set when a wrapper re-encodes the relay's output (:class:`~teegate.addons.responses.
    ResponsesOut`): that wrapper then records what is relayed, not the relay."""
    completion_id: str | None = None
    """The first chunk's ``id``: where the upstream's signature for this answer is asked."""

    def delivered(self, out: bytes) -> None:
        """Record bytes as sent on to the client."""
        self.relayed.update(out)
        self.relayed_bytes += len(out)


class _Decoder:
    """Incremental content decoding (we ask for identity, but upstreams may ignore it)."""

    def __init__(self, encoding: str) -> None:
        if encoding == "gzip":
            self._d = zlib.decompressobj(wbits=31)
        elif encoding == "deflate":
            self._d = zlib.decompressobj(wbits=15)
        elif encoding == "br":
            import brotli  # a mitmproxy dependency

            self._d = brotli.Decompressor()
        else:
            raise ValueError(encoding)
        self._br = encoding == "br"

    def __call__(self, data: bytes) -> bytes:
        return self._d.process(data) if self._br else self._d.decompress(data)


class _Relay:
    def __init__(
        self,
        tally: StreamTally,
        strip_usage: bool,
        decoder: _Decoder | None,
        *,
        model: str | None = None,
        on_mismatch: Callable[[Any], None] | None = None,
        opener: StreamOpener | None = None,
        on_e2ee_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._tally = tally
        self._strip_usage = strip_usage
        self._decoder = decoder
        self._sse = SSESplitter()
        self._model = model  # None: not checked (unit tests of the relay's other duties)
        self._on_mismatch = on_mismatch
        self._opener = opener
        self._on_e2ee_failure = on_e2ee_failure

    @property
    def records_delivery(self) -> bool:
        """Whether what this returns goes to the client as is (nothing translates it), recorded
        in the tally here (read by :class:`~teegate.addons.response_guard.GuardedStream`)."""
        return not self._tally.translated

    @property
    def _ended(self) -> bool:
        return self._tally.model_mismatch or self._tally.e2ee_failed

    @property
    def _unverified(self) -> bool:
        return self._model is not None

    def _mismatch(self, answered: Any) -> bytes:
        """Give up on this answer: one error event now, nothing after it."""
        self._tally.model_mismatch = True
        self._model = None
        if self._on_mismatch is not None:
            self._on_mismatch(answered)
        body = json.dumps(model_mismatch().body(), separators=(",", ":")).encode()
        return b"data: " + body + b"\n\n"

    def __call__(self, data: bytes) -> list[bytes]:
        """What to send on for this read: one piece (mitmproxy sends each piece as its own
        chunk and socket write, so the events of one read go out together, as they came),
        or none; never an empty piece, which HTTP/1 chunked framing would turn into a
        premature end of body."""
        out = b"".join(self._relay(data))
        if not self._tally.translated:
            self._tally.delivered(out)
        return [out] if out else []

    def _relay(self, data: bytes) -> list[bytes]:
        tally = self._tally
        if tally.first_byte_at is None:
            tally.first_byte_at = time.time()
        if self._ended:
            if data == b"":
                tally.complete = True
            return []
        try:
            if data == b"":
                tally.complete = True
                out = [self._on_event(e) for e in self._sse.flush()]
                if self._opener is not None and not self._opener.finished and not self._ended:
                    # Cut before the enclave's own end marker: say so, never end it quietly.
                    out.append(self._e2ee_failed(E2EEError("unauthenticated_end")))
                return out
            if (
                self._model is None  # the answer's model was checked (or is not checked)
                and self._decoder is None
                and self._opener is None
                and not tally.opaque
                and (payload := self._sse.lone_data(data)) is not None
            ):  # the usual read: one event, its payload's bytes straight to the parser
                tally.received.update(data)
                return [self._on_data(data, payload)]
            if self._decoder is not None:
                data = self._decoder(data)
            tally.received.update(data)
            if tally.opaque:
                return [self._mismatch(None)] if self._unverified else [data]
            return [self._on_event(e) for e in self._sse.feed(data)]
        except Exception as e:  # never break the client's stream; bill conservatively
            log.error("stream_relay_fault", error=type(e).__name__)
            tally.opaque = True
            return [self._mismatch(None)] if self._unverified else [data]

    def _e2ee_failed(self, e: E2EEError) -> bytes:
        """A frame did not open, or the enclave sent an error: one error event now, nothing
        after it. The error's detail is never logged (it may quote the prompt)."""
        self._tally.e2ee_failed = True
        self._model = None
        model_error = e.reason == "upstream_error" and e.authenticated
        if self._on_e2ee_failure is not None:
            self._on_e2ee_failure(e.reason)
        err = upstream_error() if model_error else e2ee_failed()
        body = json.dumps(err.body(), separators=(",", ":")).encode()
        return b"data: " + body + b"\n\n"

    def _on_event(self, ev: Event) -> bytes:
        if self._ended:
            return b""
        if self._opener is not None and ev.data is not None:
            try:
                plain = self._opener.open_event(ev.data)
            except E2EEError as e:
                return self._e2ee_failed(e)
            if plain is None:
                return b""  # e2e_init, or the front door's own plaintext usage
            ev = Event(raw=sse_data(plain), data=plain)
        if ev.data is None:
            self._tally.events += 1
            return ev.raw  # a comment: carries no answer
        return self._on_data(ev.raw, ev.data)

    def _on_data(self, raw: bytes, data: str | bytes) -> bytes:
        """One data event: ``raw`` as received, ``data`` its payload (bytes on the fast path)."""
        tally = self._tally
        tally.events += 1
        if len(data) < 16 and data.strip() in _DONE:  # not a copy of every chunk
            if self._unverified:
                return self._mismatch(None)  # an answer must begin with a chunk of its model
            tally.saw_done = True
            return raw
        try:
            # orjson: this runs for every event of every stream (json.loads was ~4x slower).
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = None
            if isinstance(data, bytes):  # read as the splitter would: bad UTF-8 replaced
                with contextlib.suppress(orjson.JSONDecodeError):
                    chunk = orjson.loads(data.decode("utf-8", "replace"))
        if self._unverified:
            answered = chunk.get("model") if isinstance(chunk, dict) else chunk
            if answered != self._model or not isinstance(answered, str):
                return self._mismatch(answered)
            self._model = None
        if not isinstance(chunk, dict):
            return raw
        if tally.completion_id is None and isinstance(chunk.get("id"), str):
            tally.completion_id = chunk["id"]
        choices = chunk.get("choices")
        if isinstance(choices, list):
            tally.generated_bytes += generated_bytes(choices)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            tally.usage = usage
            if self._strip_usage:
                if not choices:
                    return b""
                del chunk["usage"]
                return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        return raw


_DONE = ("[DONE]", b"[DONE]")


def sse_data(payload: str) -> bytes:
    """One SSE event carrying ``payload`` (a line break in it starts another data line)."""
    lines = payload.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"


def generated_bytes(choices: list[Any]) -> int:
    """UTF-8 bytes of generated text in streamed deltas (the billing fallback's input).

    Walks each delta's own keys (usually one or two) rather than looking up every key that
    may hold text: this runs for every chunk of every stream."""
    total = 0
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        for key, value in delta.items():
            if isinstance(value, str):
                if key in _TEXT_KEYS:
                    total += len(value) if value.isascii() else len(value.encode())
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        for k in ("name", "arguments"):
                            v = fn.get(k)
                            if isinstance(v, str):
                                total += len(v.encode())
    return total


class StreamRelay:
    @guarded_response
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flowstate.route(flow) != Route.CHAT or flow.response is None:
            return
        ctype = flow.response.headers.get("content-type", "")
        if not ctype.lower().startswith("text/event-stream"):
            return  # a plain JSON answer: buffered, read whole in the response hook
        tally = StreamTally()
        flowstate.set_stream_tally(flow, tally)
        decoder = None
        encoding = flow.response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            try:
                decoder = _Decoder(encoding)
                del flow.response.headers["content-encoding"]
            except (ValueError, ImportError):
                tally.opaque = True
        strip = not flowstate.client_wants_usage(flow)
        model = flowstate.upstream_model(flow)
        if not isinstance(model, str):
            tally.opaque = True  # cannot be checked: the relay refuses it
            model = ""
        e2ee = flowstate.e2ee(flow)
        flow.response.stream = _Relay(
            tally,
            strip,
            decoder,
            model=model,
            on_mismatch=lambda got: log_mismatch(flow, got),
            opener=e2ee.opener() if e2ee is not None else None,
            on_e2ee_failure=(lambda why: _e2ee_frame_failed(flow, why)) if e2ee else None,
        )


def _e2ee_frame_failed(flow: http.HTTPFlow, reason: str) -> None:
    """An encrypted stream ended early: say why (a fixed reason, never the error's detail)."""
    model_error = reason == "upstream_error"
    state = flowstate.e2ee(flow)
    if state is not None and not model_error:
        state.failed(sent=True)  # nothing is retried; the pool re-verifies the instance
    flowstate.set_error_code(flow, "upstream_error" if model_error else "e2ee_failed")
    log.error("e2ee_stream_ended", request_id=flowstate.request_id(flow), reason=reason)
