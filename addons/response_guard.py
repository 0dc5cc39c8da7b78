"""The response path fails closed too: an addon that raises never lets an unchecked answer out.

mitmproxy logs an exception raised in a ``responseheaders``, ``response`` or ``error`` hook, or in
a response's ``stream`` callable, and carries on: the upstream's answer would reach the client
with whatever check raised skipped (the model check, the E2EE open, the Responses translation),
and its log line would quote the exception's message. Every response-side hook is therefore
wrapped in :func:`guarded_response` (``tests/unit/test_response_guard.py`` checks every addon
of :func:`teegate.runner.build_addons`), and every stream callable a guarded ``responseheaders``
hook leaves on the response in :class:`GuardedStream`.

What failing closed means depends on how far the answer got:

* ``responseheaders`` raised: nothing was sent yet. The response becomes a ``502
  internal_error`` envelope (``x-should-retry: false``: under ``billing.unanswered = "hold"``
  each attempt is charged, and the same fault would meet the next one); the upstream's body is
  swallowed as it arrives (the client gets the envelope at its first byte, not after the whole
  generation), and the later ``responseheaders`` hooks are skipped: they would act on the
  upstream's answer (wrap its stream, label its status) that is no longer there.
* ``response`` raised on an answer not sent yet (not streamed): the response becomes the envelope.
  The later ``response`` hooks (access log, billing, ...) run on the envelope, as they do on a
  model mismatch's 502.
* a stream callable raised: the headers (``200``) are on the wire, so the stream ends with one SSE
  event carrying the envelope, the one :mod:`teegate.addons.streaming` sends on a model
  mismatch (the OpenAI SDKs raise on it), and nothing after it is relayed.
* ``response`` raised after a stream was relayed, or ``error`` raised: there is nothing left to
  withhold; only the log line.

:mod:`teegate.addons.billing` reads what was recorded (:func:`flowstate.failed_closed`) and says
how such a flow is charged. The log line names the addon, the hook, the exception's type and
where it was raised, never its message (messages can quote the answer).
"""

from __future__ import annotations

import functools
import inspect
import json
import traceback
from collections.abc import Callable
from typing import Any

import structlog
from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError
from teegate.addons.flowstate import FailedClosed

log = structlog.get_logger("teegate")

RESPONSE_HOOKS = frozenset({"responseheaders", "response", "error"})
RECEIPT_HEADER = "x-teegate-receipt"
"""Promised before the answer's first byte (:mod:`teegate.addons.receipts`); never on the
envelope that replaces a withheld answer, which gets no receipt (defined here, below the
addons that import this module)."""
GUARD_MARK = "_teegate_response_guard"


def failed_closed_error() -> GatewayError:
    return GatewayError(
        502,
        "The gateway hit an internal error while handling the upstream's answer; "
        "nothing more of the answer was relayed.",
        "internal_error",
        type="api_error",
    )


def guarded_response(hook: Callable[..., Any]) -> Any:
    """Wrap a response-side hook (``responseheaders``, ``response`` or ``error``) so that an
    exception fails the flow closed (see the module docstring).

    The wrapper calls the hook through its ``__wrapped__`` attribute, so the failure-mode tests
    (``tests/support/faulty_gateway.py``) can make the hook raise *inside* the guard.
    """
    name = hook.__name__
    if name not in RESPONSE_HOOKS:
        raise TypeError(f"guarded_response wraps response-side hooks, not {name!r}")

    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def async_wrapper(self: Any, flow: http.HTTPFlow) -> None:
            if not _before(name, flow):
                return
            try:
                await async_wrapper.__wrapped__(self, flow)  # type: ignore[attr-defined]
            except Exception as e:
                _fail(self, name, flow, e)
                return
            _after(name, flow)

        setattr(async_wrapper, GUARD_MARK, True)
        return async_wrapper

    @functools.wraps(hook)
    def wrapper(self: Any, flow: http.HTTPFlow) -> Any:
        if not _before(name, flow):
            return None
        try:
            result = wrapper.__wrapped__(self, flow)  # type: ignore[attr-defined]
        except Exception as e:
            _fail(self, name, flow, e)
            return None
        if result is not None and inspect.isawaitable(result):  # most hooks return None
            # A hook that awaits only for some flows (RateLimit's shared-limit count) returns
            # an awaitable then; mitmproxy awaits it, still under this guard.
            return _finish(self, name, flow, result)
        _after(name, flow)
        return None

    setattr(wrapper, GUARD_MARK, True)
    return wrapper


async def _finish(addon: Any, name: str, flow: http.HTTPFlow, pending: Any) -> None:
    try:
        await pending
    except Exception as e:
        _fail(addon, name, flow, e)
        return
    _after(name, flow)


def is_guarded(hook: Any) -> bool:
    return bool(getattr(hook, GUARD_MARK, False))


def _before(name: str, flow: http.HTTPFlow) -> bool:
    """Whether to run the hook; puts the envelope back where mitmproxy overwrote its body."""
    failed = flowstate.failed_closed(flow)
    if failed is None or failed[0] != FailedClosed.WITHHELD:
        return True
    if name == "responseheaders":
        return False  # the upstream's answer is gone: nothing to wrap, label or time
    resp = flow.response
    if name == "response" and resp is not None and not resp.stream:
        # A body that came with the upstream's headers is read into the replaced response.
        envelope = _envelope(flow)
        if resp.content != envelope.content:
            flow.response = envelope
    return True


def _after(name: str, flow: http.HTTPFlow) -> None:
    """Guard the stream callable a ``responseheaders`` hook left on the response (once)."""
    resp = flow.response
    if name == "responseheaders" and resp is not None and callable(resp.stream):
        if not isinstance(resp.stream, GuardedStream):
            resp.stream = GuardedStream(resp.stream, flow)


def _fail(addon: Any, name: str, flow: http.HTTPFlow, e: Exception) -> None:
    # Withhold first: nothing below (not even a broken log sink) may stop that.
    resp = flow.response
    outcome = "logged"
    if name != "error" and resp is not None and not (name == "response" and resp.stream):
        flowstate.set_failed_closed(flow, FailedClosed.WITHHELD, resp.status_code)
        flowstate.set_error_code(flow, "internal_error")
        envelope = _envelope(flow)
        if name == "responseheaders":
            envelope.stream = _Swallow(envelope.content or b"")
        flow.response = envelope
        outcome = "withheld"
    _log(type(addon).__name__, name, flow, e, outcome)


def _envelope(flow: http.HTTPFlow) -> http.Response:
    resp = failed_closed_error().response()
    headers = flowstate.response_headers(flow)
    headers.pop(RECEIPT_HEADER, None)
    resp.headers.update(headers)  # x-request-id, as on every answer
    return resp


def _log(addon: str, hook: str, flow: http.HTTPFlow, e: Exception, outcome: str) -> None:
    try:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        log.error(
            "addon_failed_closed",
            request_id=flowstate.request_id(flow),
            addon=addon,
            hook=hook,
            error=type(e).__name__,
            at=f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}",
            outcome=outcome,
        )
    except Exception:
        pass


class _Swallow:
    """The body of a withheld answer: the envelope once, none of the upstream's bytes."""

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __call__(self, data: bytes) -> list[bytes]:
        body, self._body = self._body, None
        return [body] if body else []


class GuardedStream:
    """A response's stream callable that fails closed: on an exception, one SSE error event
    and nothing after it (the upstream's further bytes are read and dropped)."""

    def __init__(self, inner: Callable[[bytes], Any], flow: http.HTTPFlow) -> None:
        self._inner = inner
        self._flow = flow
        self._ended = False
        self._relayed = False  # whether any of the answer went out before a fault

    def __call__(self, data: bytes) -> list[bytes]:
        if self._ended:
            return []
        try:
            out = _pieces(self._inner(data))
        except Exception as e:
            self._ended = True
            flow = self._flow
            how = FailedClosed.CUT if self._relayed else FailedClosed.WITHHELD
            status = flow.response.status_code if flow.response is not None else None
            flowstate.set_failed_closed(flow, how, status)
            flowstate.set_error_code(flow, "internal_error")
            body = json.dumps(failed_closed_error().body(), separators=(",", ":")).encode()
            _log(type(self._inner).__name__, "stream", flow, e, "ended")
            event = b"data: " + body + b"\n\n"
            tally = flowstate.stream_tally(flow)
            if tally is not None and getattr(self._inner, "records_delivery", False):
                tally.delivered(event)  # what the client got: its receipt and access log say so
            return [event]
        self._relayed = self._relayed or bool(out)
        return out


def _pieces(chunks: Any) -> Any:
    """What mitmproxy accepts from a stream callable (bytes, or an iterable of them) as a list."""
    if isinstance(chunks, _BYTES):
        return [chunks] if chunks else []
    return chunks if type(chunks) is list else list(chunks)


_BYTES = (bytes, bytearray)
