"""Per-key request rate limits, with OpenAI-style headers on every response.

A fixed one-minute window per key (the key's own limit, else the default).
Requests without a valid key are counted per client address, so guessing keys
is throttled too. Over the limit: ``429 rate_limit_exceeded`` with
``Retry-After``, before the balance is checked and before anything goes
upstream.

With a ledger that shares limits (PostgreSQL: every worker, every machine) a
key's window lives in the database instead of this process. A chat completion
is then counted by :mod:`teegate.addons.billing` in its reservation's own round
trip (still 429 before 402, and no extra round trip); any other keyed request
here, with one statement. Unauthenticated throttling stays per process.

Two spellings of the same numbers go out: ``X-RateLimit-Limit/-Remaining/-Reset``
(reset as a Unix time, as the gateway has always sent) and OpenAI's own
``x-ratelimit-limit-requests/-remaining-requests/-reset-requests`` (reset as a
duration such as ``6s`` or ``1m0s``), which OpenAI clients and dashboards read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cachetools
import structlog
from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, billing_unavailable, guarded, refuse
from teegate.addons.flowstate import Stage
from teegate.addons.headers import add_headers
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.response_guard import guarded_response
from teegate.addons.routes import CHAT_PATH
from teegate.ledger import LedgerError

if TYPE_CHECKING:
    from teegate.config import RateLimitSettings
    from teegate.ledger import ApiKey

log = structlog.get_logger("teegate.ratelimit")

WINDOW_S = 60


@dataclass(slots=True)
class _Window:
    started: float
    count: int = 0


def duration(seconds: float) -> str:
    """``seconds`` the way OpenAI writes ``x-ratelimit-reset-requests``: ``0.5s``, ``6s``, ``1m0s``.

    Millisecond precision; never negative (a window that just ended resets in ``0s``).
    """
    ms = max(round(seconds * 1000), 0)
    minutes, ms = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class RateLimit:
    def __init__(
        self, settings: RateLimitSettings, link: LedgerLink | None = None, clock=time.time
    ) -> None:
        self._default = settings.requests_per_minute
        self._link = link
        self._clock = clock
        # Idle buckets fall out after two windows; the size bound caps memory under a flood.
        self._windows: cachetools.TTLCache[str, _Window] = cachetools.TTLCache(
            maxsize=200_000, ttl=2 * WINDOW_S, timer=clock
        )

    def _shared(self) -> Any:
        """The ledger when it counts keys' requests in its database, else None."""
        ledger = self._link.ledger if self._link is not None else None
        return ledger if getattr(ledger, "shared_rate_limits", False) else None

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        key = flowstate.api_key(flow)
        if key is not None:
            bucket, limit = f"key:{key.key_id}", key.rate_limit or self._default
        elif flow.response is not None and flow.response.status_code == 401:
            bucket, limit = f"ip:{flow.client_conn.peername[0]}", self._default
        else:
            return
        shared = self._shared() if key is not None else None
        if shared is not None:
            if _is_chat_request(flow):
                # Counted by Billing in the reservation's own round trip (429 before 402);
                # Seal lets nothing leave that was not (RATELIMIT is passed there).
                flowstate.set_shared_limit(flow, limit)
                return
            try:
                count, started_ms = await shared.count_request(key)
            except LedgerError:  # cannot count it: refuse (retryable), as Billing does
                refuse(flow, billing_unavailable())
                return
            flowstate.set_rate_counted(flow)
            if enforce(flow, limit, count, started_ms / 1000, self._clock()):
                flowstate.passed(flow, Stage.RATELIMIT)
            return
        now = self._clock()
        window = self._windows.get(bucket)
        if window is None or now - window.started >= WINDOW_S:
            window = _Window(started=now)
        window.count += 1
        self._windows[bucket] = window
        if enforce(flow, limit, window.count, window.started, now) and key is not None:
            flowstate.passed(flow, Stage.RATELIMIT)

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._count_unreserved(flow)

    @guarded_response
    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._count_unreserved(flow)

    def _count_unreserved(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A chat request answered before Billing counted it (a 400, 404, 503...) still counts.

        Synchronous (no coroutine) for every other flow: mitmproxy awaits what a hook
        returns only when it is awaitable, so responses pay nothing without shared limits.
        Not a request refused because the ledger is unavailable: the count would go to the
        same unanswering database and hold the 503 for another deadline (a silent server).
        """
        key = flowstate.api_key(flow)
        if key is None or flowstate.shared_limit(flow) is None or flowstate.rate_counted(flow):
            return None
        if flowstate.error_code(flow) == "billing_unavailable":
            return None
        shared = self._shared()
        if shared is None:
            return None
        flowstate.set_rate_counted(flow)
        return self._count(shared, key)

    async def _count(self, shared: Any, key: ApiKey) -> None:
        try:
            await shared.count_request(key)
        except Exception as e:  # the answer is already decided; only the count is lost
            log.warning("ratelimit.count_failed", error=type(e).__name__)


def _is_chat_request(flow: http.HTTPFlow) -> bool:
    """What Router will send down the chat path (it runs later; see addons.routes)."""
    return flow.response is None and flow.request.method == "POST" and (
        flow.request.path == CHAT_PATH
    )


def enforce(flow: http.HTTPFlow, limit: int, count: int, started: float, now: float) -> bool:
    """Write the rate-limit headers for a window; refuse with 429 past ``limit``.

    ``count`` includes this request; ``started`` is the window's start (Unix seconds).
    Returns whether the request may go on.
    """
    reset = math.ceil(started + WINDOW_S)
    remaining = max(limit - count, 0)
    add_headers(
        flow,
        {
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-reset": str(reset),
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": duration(started + WINDOW_S - now),
        },
    )
    if count > limit:
        retry = max(math.ceil(started + WINDOW_S - now), 1)
        refuse(
            flow,
            GatewayError(
                429,
                f"Rate limit reached: {limit} requests per minute. Retry in {retry} s.",
                "rate_limit_exceeded",
                type="rate_limit_error",
                headers={"retry-after": str(retry)},
            ),
        )
        return False
    return True
