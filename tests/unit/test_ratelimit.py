"""RateLimit's request hook on mitmproxy test flows, with a hand-driven clock.

The headers are read where a client sees them: written onto the response by
:class:`ResponseHeaders`, as in the running chain.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from mitmproxy.test import taddons, tflow, tutils
from pydantic import ValidationError

from teegate.addons import flowstate
from teegate.addons.flowstate import Stage
from teegate.addons.headers import ResponseHeaders
from teegate.addons.ratelimit import RateLimit
from teegate.config import RateLimitSettings
from teegate.ledger import ApiKey

T0 = 1_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def keyed(key_id: int | None = 1, rate_limit: int | None = None, ip: str = "10.0.0.1"):
    """A flow as Auth leaves it: the key found (``key_id`` None: refused with 401).

    The one place this module writes the earlier addons' flow state."""
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/v1/chat/completions"))
    f.client_conn.peername = (ip, 40000)
    if key_id is None:
        f.response = tutils.tresp(status_code=401, content=b"{}")
    else:
        key = ApiKey(key_id=key_id, account_id=1, label=None, rate_limit=rate_limit)
        flowstate.set_api_key(f, key)
    return f


def seen(f) -> dict[str, str]:
    """The rate-limit headers on the response the client gets (answered upstream if none)."""
    if f.response is None:
        f.response = tutils.tresp()
    ResponseHeaders().response(f)
    return {k: v for k, v in f.response.headers.items() if k.startswith(("x-ratelimit", "retry"))}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limit(clock: Clock) -> Iterator[RateLimit]:
    """A RateLimit allowing 2 requests per minute per key by default."""
    addon = RateLimit(RateLimitSettings(requests_per_minute=2), clock=clock)
    with taddons.context(addon):
        yield addon


async def test_counts_down_then_refuses_with_retry_after(limit, clock):
    first, second, third = keyed(), keyed(), keyed()
    await limit.request(first)
    clock.now = T0 + 10
    await limit.request(second)
    clock.now = T0 + 10.5
    await limit.request(third)
    assert first.response is None and second.response is None
    assert flowstate.has_passed(first, Stage.RATELIMIT) and flowstate.has_passed(
        second, Stage.RATELIMIT
    )
    # The window opened at T0 = 1000 and resets at 1060.
    # OpenAI's spelling of the same numbers: the reset as the time left in the window.
    assert seen(first) == {
        "x-ratelimit-limit": "2",
        "x-ratelimit-remaining": "1",
        "x-ratelimit-reset": "1060",
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert seen(second)["x-ratelimit-remaining"] == "0"
    assert third.response.status_code == 429
    assert not flowstate.has_passed(third, Stage.RATELIMIT)
    error = json.loads(third.response.content)["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "rate_limit_error")
    # 1060 - 1010.5 = 49.5 s, rounded up.
    assert error["message"] == "Rate limit reached: 2 requests per minute. Retry in 50 s."
    assert seen(third) == {
        "retry-after": "50",
        "x-ratelimit-limit": "2",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1060",
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "49.5s",
    }
    assert third.response.headers["x-should-retry"] == "true"


@pytest.mark.parametrize(
    ("at", "refused"),
    [
        (T0 + 59.999, True),  # still the first window
        (T0 + 60, False),  # a new window opens
        (T0 + 600, False),  # long idle: a fresh window
    ],
)
async def test_the_window_is_one_minute(limit, clock, at, refused):
    await limit.request(keyed())
    await limit.request(keyed())
    clock.now = at
    f = keyed()
    await limit.request(f)
    assert (f.response is not None) is refused
    if not refused:
        assert seen(f)["x-ratelimit-remaining"] == "1"


async def test_retry_after_is_at_least_one_second(limit, clock):
    await limit.request(keyed())
    await limit.request(keyed())
    clock.now = T0 + 59.9999
    f = keyed()
    await limit.request(f)
    assert seen(f)["retry-after"] == "1"


async def test_a_key_s_own_limit_replaces_the_default(limit):
    flows = [keyed(rate_limit=3) for _ in range(4)]
    for f in flows:
        await limit.request(f)
    assert [f.response is None for f in flows] == [True, True, True, False]
    assert seen(flows[0])["x-ratelimit-limit"] == "3"


async def test_keys_are_counted_apart(limit):
    for _ in range(2):
        await limit.request(keyed(key_id=1))
    other = keyed(key_id=2)
    await limit.request(other)
    assert other.response is None and seen(other)["x-ratelimit-remaining"] == "1"


async def test_unauthenticated_attempts_are_counted_per_client_address(limit):
    guesses = [keyed(key_id=None) for _ in range(3)]
    for f in guesses:
        await limit.request(f)
    assert [f.response.status_code for f in guesses] == [401, 401, 429]
    assert not any(
        flowstate.has_passed(f, Stage.RATELIMIT) for f in guesses
    )  # still refused, never passed
    elsewhere = keyed(key_id=None, ip="10.0.0.2")
    await limit.request(elsewhere)
    assert elsewhere.response.status_code == 401
    # A key's bucket is not the address's.
    keyed_flow = keyed(key_id=1)
    await limit.request(keyed_flow)
    assert keyed_flow.response is None


async def test_a_flow_with_no_key_and_no_401_is_not_counted(limit):
    f = tflow.tflow(req=tutils.treq(method=b"GET", path=b"/health"))
    await limit.request(f)
    assert f.response is None and not flowstate.has_passed(f, Stage.RATELIMIT)
    assert seen(f) == {}


@pytest.mark.parametrize("rpm", [0, -1])
async def test_a_limit_below_one_is_refused_by_the_settings(rpm):
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        RateLimitSettings(requests_per_minute=rpm)
