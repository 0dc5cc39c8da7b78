"""Per-key request rate limits, with OpenAI-style headers on every response.

A fixed one-minute window per key (the key's own limit, else the default).
Requests without a valid key are counted per client address, so guessing keys
is throttled too. Over the limit: ``429 rate_limit_exceeded`` with
``Retry-After``, before the balance is checked and before anything goes
upstream.

Two spellings of the same numbers go out: ``X-RateLimit-Limit/-Remaining/-Reset``
(reset as a Unix time, as the gateway has always sent) and OpenAI's own
``x-ratelimit-limit-requests/-remaining-requests/-reset-requests`` (reset as a
duration such as ``6s`` or ``1m0s``), which OpenAI clients and dashboards read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cachetools
from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, guarded, refuse
from teegate.addons.flowstate import Stage
from teegate.addons.headers import add_headers

if TYPE_CHECKING:
    from teegate.config import RateLimitSettings

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
    def __init__(self, settings: RateLimitSettings, clock=time.time) -> None:
        self._default = settings.requests_per_minute
        self._clock = clock
        # Idle buckets fall out after two windows; the size bound caps memory under a flood.
        self._windows: cachetools.TTLCache[str, _Window] = cachetools.TTLCache(
            maxsize=200_000, ttl=2 * WINDOW_S, timer=clock
        )

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        key = flowstate.api_key(flow)
        if key is not None:
            bucket, limit = f"key:{key.key_id}", key.rate_limit or self._default
        elif flow.response is not None and flow.response.status_code == 401:
            bucket, limit = f"ip:{flow.client_conn.peername[0]}", self._default
        else:
            return
        now = self._clock()
        window = self._windows.get(bucket)
        if window is None or now - window.started >= WINDOW_S:
            window = _Window(started=now)
        window.count += 1
        self._windows[bucket] = window
        reset = math.ceil(window.started + WINDOW_S)
        remaining = max(limit - window.count, 0)
        add_headers(
            flow,
            {
                "x-ratelimit-limit": str(limit),
                "x-ratelimit-remaining": str(remaining),
                "x-ratelimit-reset": str(reset),
                "x-ratelimit-limit-requests": str(limit),
                "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": duration(window.started + WINDOW_S - now),
            },
        )
        if window.count > limit:
            retry = max(math.ceil(window.started + WINDOW_S - now), 1)
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
            return
        if key is not None:
            flowstate.passed(flow, Stage.RATELIMIT)
