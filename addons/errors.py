"""OpenAI's error envelope, and the guard that makes the request path fail closed.

mitmproxy logs an addon's exception and *forwards the request anyway*. Every
request-path hook is therefore wrapped in :func:`guarded`: an exception turns
into a ``500`` envelope (so nothing goes upstream) and a log line that names
the exception's type and where it was raised, never its message (messages can
quote request content). The response path has its own guard, which withholds an answer
instead: :mod:`teegate.addons.response_guard`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import traceback
from collections.abc import Callable
from typing import Any

import structlog
from mitmproxy import http

from teegate.addons import flowstate

log = structlog.get_logger("teegate")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
}

# Whether sending the same request again can succeed, per error code, sent as ``x-should-retry``.
# OpenAI's SDKs obey that header before their own rule (retry 408, 409, 429 and every 5xx), so
# without it a ``503 not_available`` is sent three times and a transient ``503`` retried only by
# luck. A code missing here falls back to its status (:func:`should_retry`).
RETRY_BY_CODE: dict[str, bool] = {
    # Retry helps: capacity, a cache being filled, or a dependency coming back.
    "rate_limit_exceeded": True,
    "catalog_unavailable": True,
    "no_attested_instance": True,
    "e2ee_instance_unavailable": True,
    "billing_unavailable": True,
    "attestation_unavailable": True,
    "attestation_pending": True,
    "upstream_unreachable": True,
    "upstream_timeout": True,
    "upstream_disconnected": True,
    # No retry can fix it: the endpoint has no confidential variant, ever.
    "not_available": False,
    # A refusal the gateway chose: the same bytes are refused again.
    "internal_error": False,
}


def should_retry(status: int, code: str | None) -> bool | None:
    """The ``x-should-retry`` verdict for an error; ``None`` leaves the SDK's own rule."""
    if code in RETRY_BY_CODE:
        return RETRY_BY_CODE[code]
    if status in (408, 409, 429):
        return True
    if 400 <= status < 500:
        return False  # the request itself is wrong (or unpaid): resending it changes nothing
    if status in (502, 503, 504):
        return True
    return None


class GatewayError(Exception):
    """A refusal with an HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        *,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        default_type = "api_error" if status >= 500 else "invalid_request_error"
        self.type = type or ERROR_TYPES.get(status, default_type)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                "status": self.status,
            },
            # Also beside ``error``, where clients written against earlier releases read it.
            "status": self.status,
        }

    def response(self) -> http.Response:
        headers = dict(self.headers)
        retry = should_retry(self.status, self.code)
        if retry is not None:
            headers.setdefault("x-should-retry", "true" if retry else "false")
        return json_response(self.status, self.body(), headers)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> http.Response:
    # A message may echo a client's key or field name, which may hold a lone surrogate (valid
    # as a JSON escape, not as UTF-8): written back as the escape it came in as, never a 500.
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    data = text.encode("utf-8", "backslashreplace")
    hdrs = {"content-type": "application/json", **(headers or {})}
    return http.Response.make(status, data, hdrs)


def refuse(flow: http.HTTPFlow, err: GatewayError) -> None:
    """Answer locally; mitmproxy then never contacts the upstream for this flow."""
    flow.response = err.response()
    flowstate.set_error_code(flow, err.code)


def billing_unavailable() -> GatewayError:
    """The ledger cannot answer (its database is down or restarting): retryable, nothing sent."""
    return GatewayError(
        503,
        "Billing is unavailable; the request was not sent.",
        "billing_unavailable",
        type="api_error",
    )


def internal_error() -> GatewayError:
    return GatewayError(
        500,
        "The gateway hit an internal error and did not forward the request.",
        "internal_error",
        type="api_error",
    )


def guarded(hook: Callable[..., Any]) -> Any:
    """Wrap a request-path hook so any exception refuses the flow with a 500."""

    if _is_coroutine(hook):

        @functools.wraps(hook)
        async def async_wrapper(self: Any, flow: http.HTTPFlow) -> None:
            try:
                await hook(self, flow)
            except Exception as e:
                _fail(self, hook, flow, e)

        return async_wrapper

    @functools.wraps(hook)
    def wrapper(self: Any, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception as e:
            _fail(self, hook, flow, e)

    return wrapper


def _is_coroutine(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn)


def _fail(addon: Any, hook: Callable[..., Any], flow: http.HTTPFlow, e: Exception) -> None:
    # Refuse first: nothing below (not even a broken log sink) may stop that.
    if flow.response is None or hook.__name__ == "request":
        refuse(flow, internal_error())
    try:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        log.error(
            "addon_failed_closed",
            request_id=flowstate.request_id(flow),
            addon=type(addon).__name__,
            hook=hook.__name__,
            error=type(e).__name__,
            at=f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}",
        )
    except Exception:
        pass


# The envelope for the error page mitmproxy is about to write for the flow whose
# ``error`` hook just ran. mitmproxy awaits that hook and then writes the page in
# the same task, so a context variable carries the choice across safely
# (:mod:`teegate.addons.error_pages` writes it).
next_error_page: contextvars.ContextVar[GatewayError | None] = contextvars.ContextVar(
    "teegate_next_error_page", default=None
)


# mitmproxy's error texts quote what it choked on ("illegal chunk header: bytearray(b'...')",
# "invalid content-length header: b'...'"): client bytes, prompts and keys among them. They are
# never logged; only the first category whose words they contain is.
_CATEGORIES = (
    ("body_too_large", ("body_size_limit", "too large")),
    ("killed", ("killed",)),
    ("client_disconnected", ("client disconnected", "client closed")),
    ("timeout", ("timed out", "timeout")),
    ("tls_failed", ("tls", "ssl", "certificate", "handshake")),
    (
        "upstream_unreachable",
        ("connect call failed", "refused", "unreachable", "no route", "getaddrinfo", "name or"),
    ),
    (
        "upstream_disconnected",
        ("server disconnected", "server closed", "peer closed", "incomplete", "reset"),
    ),
    ("invalid_http", ("protocol error", "invalid", "illegal", "malformed", "smuggling", "peer")),
)


def error_category(message: str | None) -> str | None:
    """A fixed word for one of mitmproxy's error messages; never any of the message itself."""
    if message is None:
        return None
    text = message.lower()
    for category, words in _CATEGORIES:
        if any(w in text for w in words):
            return category
    return "other"


def method_not_allowed(method: str, path: str, allowed: str) -> GatewayError:
    """The 405 for a path that exists, naming the one method it takes (``allow`` header too)."""
    return GatewayError(
        405,
        f"Method {method} is not allowed on {path}; use {allowed}.",
        "method_not_allowed",
        headers={"allow": allowed},
    )
