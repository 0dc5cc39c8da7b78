"""``POST /v1/responses`` on the chat completion path: translate in, translate the answer out.

:class:`ResponsesIn` runs just before the Router. It rewrites a Responses request into the chat
completion it means (:mod:`.responses_api`) and records on the flow that the client spoke
Responses; from there the request is a chat completion to every addon after it (the allow-list
validator, the TEE and attestation gates, billing, rate limits, the upstream rewrite), so each
applies unchanged and the upstream only ever sees ``POST /v1/chat/completions``. A request it
cannot translate is refused with a 400 before any of them runs; an exception refuses it with a
500 (``guarded``): nothing goes upstream either way.

:class:`ResponsesOut` runs after billing and the stream relay. Billing reads the chat answer
(its ``usage``) before this addon rewrites it, and the relay tallies the chat chunks before this
addon's wrapper translates them, so what is charged is exactly what it is for chat; only the
bytes the client receives are translated. Errors (the gateway's refusals, the upstream's error
answers) keep the OpenAI error envelope, which the Responses API shares.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import structlog
from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, guarded, json_response, refuse
from teegate.addons.flowstate import Route, Stage
from teegate.addons.jsonbody import parse_json_object
from teegate.addons.response_guard import guarded_response
from teegate.addons.responses_answer import response_from_chat
from teegate.addons.responses_api import passthrough_fields, responses_param, to_chat
from teegate.addons.responses_stream import ResponsesStream
from teegate.addons.routes import CHAT_PATH, RESPONSES_PATH
from teegate.addons.validate import decoded_body

if TYPE_CHECKING:
    from teegate.addons.streaming import StreamTally
    from teegate.config import LimitSettings, RequestSettings

log = structlog.get_logger("teegate")


class ResponsesIn:
    def __init__(self, limits: LimitSettings, request: RequestSettings | None = None) -> None:
        self._max_body = limits.max_body_bytes
        self._max_depth = limits.max_json_depth
        extra = request.allowed_extra if request is not None else frozenset()
        self._passthrough = passthrough_fields(extra)

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flowstate.route(flow) == Route.PASSTHROUGH:
            return
        if flow.request.path != RESPONSES_PATH or flow.request.method.upper() != "POST":
            return  # another path, a query string or another method: the Router answers
        try:
            raw = decoded_body(flow.request, self._max_body)
            doc = parse_json_object(raw, max_depth=self._max_depth)
            chat, call = to_chat(doc, self._passthrough)
        except GatewayError as e:
            flowstate.set_route(flow, Route.LOCAL)
            refuse(flow, e)
            return
        flowstate.set_responses_call(flow, call)
        body = json.dumps(chat, separators=(",", ":"), ensure_ascii=False)
        flow.request.headers.pop("content-encoding", None)
        flow.request.content = body.encode("utf-8", "backslashreplace")
        flow.request.path = CHAT_PATH


def _effective(flow: http.HTTPFlow) -> dict[str, Any]:
    """The sampling values the chat completion was sent with (the gateway's defaults applied)."""
    req = flowstate.chat_request(flow)
    return {"temperature": req.temperature, "top_p": req.top_p, "max_output_tokens": req.budget}


def translation_failed() -> GatewayError:
    return GatewayError(
        502,
        "The upstream's answer could not be translated into a Responses object.",
        "upstream_invalid_response",
        type="api_error",
    )


class _Translated:
    """The stream relay's output, translated into Responses events on its way to the client;
    the relay's tally records these bytes as relayed (the receipt, the access log)."""

    def __init__(
        self,
        relay: Callable[[bytes], Any],
        stream: ResponsesStream,
        rid: str | None,
        tally: StreamTally | None = None,
    ):
        self._relay = relay
        self._stream = stream
        self._rid = rid
        self._tally = tally
        if tally is not None:
            tally.translated = True

    @property
    def records_delivery(self) -> bool:
        """What this returns goes to the client as is, recorded in the tally by this wrapper
        (read by :class:`~teegate.addons.response_guard.GuardedStream`)."""
        return True

    def __call__(self, data: bytes) -> list[bytes]:
        pieces = self._relay(data)
        if isinstance(pieces, bytes | bytearray):
            pieces = [pieces]
        out = self._translate(pieces, end=data == b"")
        if self._tally is not None:
            self._tally.delivered(out)
        return [out] if out else []

    def _translate(self, pieces: Iterable[bytes], *, end: bool) -> bytes:
        stream = self._stream
        if stream.ended:
            return b""
        try:
            out = b"".join(stream.feed(bytes(p)) for p in pieces)
            return out + stream.close() if end else out
        except Exception as e:  # end the answer with an error event, never break the stream
            log.error("responses_stream_failed", request_id=self._rid, error=type(e).__name__)
            return stream.abort()


class ResponsesOut:
    @guarded_response
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = flowstate.responses_call(flow)
        resp = flow.response
        if call is None or resp is None or not callable(resp.stream):
            return
        try:
            effective = _effective(flow)
        except flowstate.MissingState:  # only echoed values: the answer is translated anyway
            effective = {}
        stream = ResponsesStream(call, effective)
        tally = flowstate.stream_tally(flow)
        resp.stream = _Translated(resp.stream, stream, flowstate.request_id(flow), tally)

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        call = flowstate.responses_call(flow)
        resp = flow.response
        if call is None or resp is None:
            return
        if resp.status_code >= 400:
            _rename_param(resp)
            return
        if flowstate.stream_tally(flow) is not None or not flowstate.has_passed(
            flow, Stage.UPSTREAM
        ):
            return  # a stream (translated as it went), or an answer the gateway made
        try:
            body = response_from_chat(call, resp.json(), _effective(flow))
        except Exception as e:
            log.error(
                "responses_translation_failed",
                request_id=flowstate.request_id(flow),
                error=type(e).__name__,
            )
            err = translation_failed()
            flow.response = err.response()
            flowstate.set_error_code(flow, err.code)
            return
        translated = json_response(resp.status_code, body)
        resp.headers.pop("content-encoding", None)
        resp.headers["content-type"] = "application/json"
        resp.content = translated.content


def _rename_param(resp: http.Response) -> None:
    """An error envelope's ``param`` as the Responses request names it (``text.format``, not
    ``response_format``); anything else about the error is left as it is."""
    if not resp.headers.get("content-type", "").startswith("application/json"):
        return
    try:
        doc = resp.json()
    except ValueError:
        return
    err = doc.get("error") if isinstance(doc, dict) else None
    param = err.get("param") if isinstance(err, dict) else None
    if not isinstance(param, str) or (renamed := responses_param(param)) == param:
        return
    err["param"] = renamed
    resp.content = json_response(resp.status_code, doc).content
