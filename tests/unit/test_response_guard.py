"""The response-side guard (addons/response_guard.py) with mitmproxy's tflow: a hook or stream
that raises withholds what is left of the answer, and every response-side hook is guarded."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tflow, tutils
from structlog.testing import capture_logs

from teegate import config
from teegate.addons import flowstate
from teegate.addons.flowstate import FailedClosed
from teegate.addons.headers import add_headers
from teegate.addons.response_guard import (
    RESPONSE_HOOKS,
    GuardedStream,
    guarded_response,
    is_guarded,
)
from teegate.runner import build_addons

SECRET = "secret answer text"


def answered(content: bytes = b'{"choices":[{"message":{"content":"secret answer text"}}]}'):
    flow = tflow.tflow(resp=tutils.tresp(status_code=200, content=content))
    flowstate.set_request_id(flow, "req_test")
    add_headers(flow, {"x-request-id": "req_test"})
    return flow


class Broken:
    """One addon whose hooks raise with a message that must never be logged or sent."""

    @guarded_response
    def responseheaders(self, flow):
        raise KeyError(SECRET)

    @guarded_response
    def response(self, flow):
        raise KeyError(SECRET)

    @guarded_response
    def error(self, flow):
        raise KeyError(SECRET)


class Seen:
    """A later addon: records which of its hooks ran and what the response was then."""

    def __init__(self):
        self.calls = []

    @guarded_response
    def responseheaders(self, flow):
        self.calls.append(("responseheaders", flow.response.status_code))

    @guarded_response
    def response(self, flow):
        self.calls.append(("response", flow.response.status_code, flow.response.content))


def assert_envelope(flow):
    resp = flow.response
    assert resp.status_code == 502
    assert resp.headers["x-should-retry"] == "false"
    assert resp.headers["x-request-id"] == "req_test"
    assert json.loads(resp.content)["error"]["code"] == "internal_error"
    assert SECRET.encode() not in resp.content
    assert flowstate.error_code(flow) == "internal_error"


def test_every_response_side_hook_of_every_addon_is_guarded():
    """mitmproxy relays the answer when one of these raises: each must be wrapped."""
    unguarded = []
    for addon in build_addons(config.Settings()):
        for child in [addon, *getattr(addon, "addons", ())]:
            for name in sorted(RESPONSE_HOOKS):
                hook = getattr(child, name, None)
                if hook is not None and not is_guarded(hook):
                    unguarded.append(f"{type(child).__name__}.{name}")
    assert unguarded == []


def test_the_log_and_the_metrics_run_after_every_hook_that_may_replace_the_answer():
    """A hook that fails closed turns the answer into a 502: whatever describes the answer
    (receipt, access log, metrics) must run after it, or describes one the client never got.
    Only Drain and ReceiptRelease (they replace nothing) may follow them."""
    addons = build_addons(config.Settings())
    names = [type(a).__name__ for a in addons]
    first = min(names.index(n) for n in ("ReceiptIssuer", "AccessLog", "RequestMetrics"))
    after = [
        type(a).__name__
        for a in addons[first:]
        if any(getattr(a, hook, None) is not None for hook in RESPONSE_HOOKS)
    ]
    want = ["AccessLog", "Drain", "ReceiptIssuer", "ReceiptRelease", "RequestMetrics"]
    assert sorted(after) == want


def test_a_request_hook_cannot_be_response_guarded():
    with pytest.raises(TypeError):

        @guarded_response
        def request(self, flow):
            pass


def test_responseheaders_that_raises_withholds_the_whole_answer():
    flow = answered()
    later = Seen()
    with capture_logs() as logs:
        Broken().responseheaders(flow)
        later.responseheaders(flow)  # skipped: the upstream's answer is gone
    assert_envelope(flow)
    assert later.calls == []
    assert flowstate.failed_closed(flow) == (FailedClosed.WITHHELD, 200)
    # The upstream's body is swallowed as it streams in; the envelope goes out once.
    envelope = flow.response.content
    assert flow.response.stream(b"data: secret answer text\n\n") == [envelope]
    assert flow.response.stream(b"more") == [] and flow.response.stream(b"") == []
    (line,) = logs
    assert line["event"] == "addon_failed_closed" and line["outcome"] == "withheld"
    assert (line["addon"], line["hook"], line["error"]) == ("Broken", "responseheaders", "KeyError")
    assert line["at"].startswith("test_response_guard.py:")
    assert SECRET not in repr(logs)


def test_an_overwritten_body_is_put_back_before_any_response_hook_reads_it():
    """An answer with no body to stream: mitmproxy reads it into the replaced response."""
    flow = answered()
    Broken().responseheaders(flow)
    flow.response.stream = False
    flow.response.content = SECRET.encode()
    later = Seen()
    later.response(flow)
    assert_envelope(flow)
    assert later.calls[0][1] == 502 and SECRET.encode() not in later.calls[0][2]


def test_response_that_raises_replaces_a_plain_answer():
    flow = answered()
    later = Seen()
    Broken().response(flow)
    later.response(flow)
    assert_envelope(flow)
    assert later.calls == [("response", 502, flow.response.content)]
    assert flowstate.failed_closed(flow) == (FailedClosed.WITHHELD, 200)


def test_response_that_raises_after_a_stream_was_relayed_only_logs():
    flow = answered()
    flow.response.stream = GuardedStream(lambda data: [data], flow)
    with capture_logs() as logs:
        Broken().response(flow)
    assert flow.response.status_code == 200
    assert flowstate.failed_closed(flow) is None
    assert logs[0]["outcome"] == "logged"


def test_error_that_raises_only_logs():
    flow = tflow.tflow(err=True)
    with capture_logs() as logs:
        Broken().error(flow)
    assert flow.response is None and logs[0]["hook"] == "error"


async def test_an_async_hook_is_guarded_too():
    class AsyncBroken:
        @guarded_response
        async def response(self, flow):
            raise KeyError(SECRET)

    flow = answered()
    await AsyncBroken().response(flow)
    assert_envelope(flow)


def test_a_stream_callable_set_by_responseheaders_is_guarded():
    class SetsStream:
        @guarded_response
        def responseheaders(self, flow):
            flow.response.stream = lambda data: [data]

    flow = answered()
    SetsStream().responseheaders(flow)
    assert isinstance(flow.response.stream, GuardedStream)
    inner = flow.response.stream
    SetsStream().responseheaders(flow)  # wrapped once more only if replaced
    assert isinstance(flow.response.stream, GuardedStream) and flow.response.stream is not inner


class FailsOnCall:
    def __init__(self, fail_at: int):
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, data):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError(SECRET)
        return data


@pytest.mark.parametrize(("fail_at", "how"), [(1, FailedClosed.WITHHELD), (2, FailedClosed.CUT)])
def test_a_stream_that_raises_ends_with_one_error_event(fail_at, how):
    flow = answered()
    inner = FailsOnCall(fail_at)
    stream = GuardedStream(inner, flow)
    out = [stream(b"data: {}\n\n") for _ in range(3)] + [stream(b"")]
    relayed = [piece for pieces in out for piece in pieces]
    assert relayed[: fail_at - 1] == [b"data: {}\n\n"] * (fail_at - 1)
    (event, *after) = relayed[fail_at - 1 :]
    assert after == [] and inner.calls == fail_at  # nothing more read from it, or relayed
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["code"] == "internal_error"
    assert SECRET.encode() not in event
    assert flowstate.failed_closed(flow) == (how, 200)
