"""mitmproxy's own error pages: JSON envelopes, and their status on the flow.

mitmproxy writes some answers itself, from inside its HTTP layers and after the ``error`` hook
(502 when a server cannot be reached, 413 for a body over ``body_size_limit``, 400 for a
request head it cannot read or that fails its smuggling check). No addon can replace them, so
the builder is swapped for one that writes the gateway's envelope (:func:`html_free_error_pages`),
and the status each page will carry is noted on the flow before its ``error`` hook, where the
access log and the metrics record it: they describe what the client got, not ``status=None``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, next_error_page


def html_free_error_pages() -> None:
    """Make mitmproxy's own protocol-error pages (502 on connect failure, ...) JSON.

    mitmproxy writes these from inside its HTTP/1 layer, after the ``error``
    hook, so no addon can replace them; the layer looks the builder up by name
    at call time, so swapping it here is enough. An addon may choose the
    envelope through :data:`next_error_page` in its ``error`` hook.
    """
    from mitmproxy.proxy.layers.http import _http1

    if getattr(_http1.make_error_response, "_teegate", False):
        return

    def make_error_response(status_code: int, message: str = "") -> bytes:
        from mitmproxy.net.http import http1

        err = next_error_page.get()
        next_error_page.set(None)
        if err is None:
            code, text = _classify(status_code)
            err = GatewayError(status_code, text, code)
        resp = err.response()
        resp.headers["connection"] = "close"
        return http1.assemble_response(resp)

    make_error_response._teegate = True  # type: ignore[attr-defined]
    _http1.make_error_response = make_error_response
    _record_error_page_status()


def _record_error_page_status() -> None:
    """Note on the flow the status of the error page mitmproxy is about to write for it.

    Its own pages (502 when an egress passthrough's host refuses the connection or a server
    breaks off, ...) are written after the ``error`` hook, where the access log and the
    metrics record the flow: without this they saw no response and recorded ``status=None``
    for a client that got a 502. The status is mitmproxy's own choice
    (``ErrorCode.http_status_code``, the same for HTTP/1 and HTTP/2 clients), taken from the
    protocol error before the hook runs; an addon that writes its own page in the hook
    (:mod:`teegate.addons.deadline`) overrides it there.
    """
    from mitmproxy.proxy.layers.http import HttpStream, ResponseProtocolError

    original = HttpStream.handle_protocol_error
    if getattr(original, "_teegate", False):
        return

    def handle_protocol_error(self: Any, event: Any) -> Any:
        # A request head mitmproxy already answered with its 400 (_record_refusal_page_status).
        answered = _ANSWERED_400.pop(self.flow.request, None) if self.flow else None
        if answered is not None:
            _refused_by_page(self.flow, answered)
        if (
            isinstance(event, ResponseProtocolError)
            and self.client_state != self.state_errored  # else nothing goes to the client
            and self.flow.response is None
        ):
            status = event.code.http_status_code()
            if status is not None:
                flowstate.set_error_page_status(self.flow, status)
        return original(self, event)

    handle_protocol_error._teegate = True  # type: ignore[attr-defined]
    HttpStream.handle_protocol_error = handle_protocol_error  # type: ignore[method-assign]
    _record_refusal_page_status()


# Requests whose HTTP/1 head mitmproxy answered with its 400 page itself, before any flow
# existed (a Content-Length or Transfer-Encoding it could not read): their flow is made from the
# same Request object, right after, and ends in the error hook.
_ANSWERED_400: weakref.WeakKeyDictionary[http.Request, int] = weakref.WeakKeyDictionary()


def _record_refusal_page_status() -> None:
    """The same for the pages mitmproxy writes on routes that bypass ``handle_protocol_error``.

    * A body over ``body_size_limit`` (``check_body_size``: 413) and a request whose header
      fields fail its smuggling check (``check_invalid``: 400) run the ``error`` hook and then
      send the page: the status is noted as the hook is yielded. Each check's status is
      mitmproxy's own (``ErrorCode.…http_status_code``) for the code it sends right after.
    * A head whose framing it cannot read gets its 400 from the HTTP/1 layer before the flow
      exists; the Request is remembered then, and the status set when its flow's protocol
      error is handled (the one ``handle_protocol_error`` wrapper, above), before its error
      hook runs.

    A header section too large to buffer (teegate/master.py: 431) never becomes a flow: it is
    announced by a hook of its own (``request_head_too_large``), which the access log and the
    metrics record.
    """
    from mitmproxy.proxy.layers.http import ErrorCode, HttpErrorHook, HttpStream, _http1
    from mitmproxy.proxy.layers.http._base import ReceiveHttp
    from mitmproxy.proxy.layers.http._events import RequestHeaders

    if getattr(HttpStream.check_invalid, "_teegate_page", False):
        return
    too_large = ErrorCode.REQUEST_TOO_LARGE.http_status_code()
    invalid = ErrorCode.REQUEST_VALIDATION_FAILED.http_status_code()

    def noting(check: Callable[..., Any], status: int | None) -> Callable[..., Any]:
        def wrapped(self: Any, request: bool) -> Any:
            gen = check(self, request)
            try:
                command = next(gen)
                while True:
                    if isinstance(command, HttpErrorHook) and request and status is not None:
                        _refused_by_page(self.flow, status)
                    command = gen.send((yield command))
            except StopIteration as stop:
                return stop.value

        wrapped._teegate_page = True  # type: ignore[attr-defined]
        return wrapped

    HttpStream.check_body_size = noting(HttpStream.check_body_size, too_large)  # type: ignore[method-assign]
    HttpStream.check_invalid = noting(HttpStream.check_invalid, invalid)  # type: ignore[method-assign]

    read_headers = _http1.Http1Server.read_headers

    def read_headers_noting(self: Any, event: Any) -> Any:
        gen = read_headers(self, event)
        page = False
        try:
            command = next(gen)
            while True:
                if isinstance(command, _http1.commands.SendData):
                    page = command.data.startswith(b"HTTP/1.1 400 ")
                elif page and isinstance(command, ReceiveHttp):
                    if isinstance(command.event, RequestHeaders):
                        _ANSWERED_400[command.event.request] = 400
                command = gen.send((yield command))
        except StopIteration as stop:
            return stop.value

    _http1.Http1Server.read_headers = read_headers_noting  # type: ignore[method-assign]


def _refused_by_page(flow: http.HTTPFlow, status: int) -> None:
    """A request mitmproxy refused with its own page: the page's status and its code on the
    flow, as a refusal by an addon would be."""
    if flow.response is None and flowstate.error_code(flow) is None:
        flowstate.set_error_page_status(flow, status)
        flowstate.set_error_code(flow, page_code(status))


def page_code(status: int) -> str:
    """The error code the gateway's page for ``status`` carries (what a log line records)."""
    return _classify(status)[0]


def _classify(status: int) -> tuple[str, str]:
    if status == 502:
        return "upstream_unreachable", "The confidential upstream could not be reached."
    if status == 504:
        return "upstream_timeout", "The confidential upstream did not answer in time."
    if status == 413:
        return "request_too_large", "The request body is too large."
    if status == 400:
        return "invalid_request", "The request could not be parsed as HTTP."
    if status == 431:
        return "request_header_fields_too_large", "The request's header section is too large."
    return "gateway_error", f"The gateway could not complete the request (HTTP {status})."
