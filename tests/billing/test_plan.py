"""The settlement plan: how a finished (or broken-off) flow is to be charged.

No gateway here: a flow is shaped by hand and :func:`_settlement` read as a value.
Token counts from bytes are a third, rounded up (``tokens_from_bytes``); the output
budget of every request below is 100.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.test import tflow

from teegate.addons import flowstate
from teegate.addons.billing import Release, Settle, _settlement
from teegate.addons.schema import ChatRequest
from teegate.addons.streaming import StreamTally
from teegate.ledger import Prices, Reservation, estimate_prompt_tokens

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
ESTIMATE = estimate_prompt_tokens(BODY)
HELD = "unanswered ({}): charged the reservation"
USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 34,
    "prompt_tokens_details": {"cached_tokens": 5},
}


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _flow(
    *,
    status: int | None = 200,
    body: bytes = b"",
    tally: StreamTally | None = None,
    sent: bool = True,
    timed_out: bool = False,
    error: str | None = None,
    error_code: str | None = None,
) -> http.HTTPFlow:
    f = tflow.tflow(resp=status is not None)
    if f.response is not None and status is not None:
        f.response.status_code = status
        f.response.content = body
    if not sent:
        f.server_conn.timestamp_tcp_setup = None
    if error is not None:
        f.error = mflow.Error(error)
    flowstate.set_chat_request(f, ChatRequest.model_validate(BODY))
    if tally is not None:
        flowstate.set_stream_tally(f, tally)
    if timed_out:
        flowstate.set_timed_out(f)
    if error_code is not None:
        flowstate.set_error_code(f, error_code)
    return f


def _bytes(completion: int, status: str) -> Settle:
    return Settle(prompt=ESTIMATE, completion=completion, cached=0, source="bytes", status=status)


CASES = [
    pytest.param(
        _flow(body=_json({"usage": USAGE})),
        True,
        Settle(prompt=12, completion=34, cached=5, source="usage", status="ok"),
        id="json usage",
    ),
    pytest.param(
        _flow(body=_json({"usage": USAGE})),
        False,
        Settle(prompt=12, completion=34, cached=5, source="usage", status="aborted"),
        id="json usage, broken off",
    ),
    pytest.param(
        _flow(body=_json({"choices": [{"message": {"content": "abcdefg"}}]})),
        True,
        _bytes(3, "ok"),
        id="json without usage: 7 bytes",
    ),
    pytest.param(
        _flow(body=_json({"usage": {**USAGE, "prompt_tokens": 4}})),
        True,
        _bytes(0, "ok"),
        id="cached above prompt: usage ignored",
    ),
    pytest.param(_flow(body=b"not json"), True, _bytes(100, "unreadable"), id="unreadable"),
    pytest.param(
        _flow(tally=StreamTally(usage=USAGE, generated_bytes=99)),
        True,
        Settle(prompt=12, completion=34, cached=5, source="usage", status="ok"),
        id="stream usage",
    ),
    pytest.param(
        _flow(tally=StreamTally(generated_bytes=30)), False, _bytes(10, "aborted"), id="stream"
    ),
    pytest.param(
        _flow(tally=StreamTally(opaque=True, generated_bytes=30)),
        True,
        _bytes(100, "unreadable"),
        id="opaque stream",
    ),
    pytest.param(
        _flow(status=500, body=b"{}"), True, Release("upstream answered HTTP 500"), id="http 500"
    ),
    pytest.param(
        _flow(status=500, tally=StreamTally(generated_bytes=3)),
        True,
        _bytes(1, "ok"),
        id="http 500 after tokens",
    ),
    pytest.param(
        _flow(error_code="upstream_model_mismatch", body=_json({"usage": USAGE})),
        True,
        Release("the upstream answered for another model"),
        id="another model",
    ),
    pytest.param(
        _flow(status=None, sent=False),
        False,
        Release("never reached the upstream"),
        id="never sent",
    ),
    pytest.param(
        _flow(status=None, timed_out=True),
        False,
        _bytes(100, HELD.format("upstream timeout")),
        id="timed out",
    ),
    pytest.param(
        _flow(status=None, error="Client disconnected."),
        False,
        _bytes(100, HELD.format("client disconnected")),
        id="client left",
    ),
    pytest.param(
        _flow(status=None, error="Connection reset"),
        False,
        _bytes(100, HELD.format("connection lost")),
        id="connection lost",
    ),
]


@pytest.mark.parametrize("flow, complete, expected", CASES)
def test_settlement_plan(flow: http.HTTPFlow, complete: bool, expected: Release | Settle) -> None:
    assert _settlement(flow, _reservation(), complete=complete) == expected


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("hold", _bytes(100, HELD.format("upstream timeout"))),
        ("release", Release("unanswered (upstream timeout); billing.unanswered = release")),
    ],
)
def test_unanswered_follows_the_rule(rule: Any, expected: Release | Settle) -> None:
    flow = _flow(status=None, timed_out=True)
    assert _settlement(flow, _reservation(), complete=False, unanswered=rule) == expected


def _reservation() -> Reservation:
    return Reservation(
        id=1,
        request_id="r",
        account_id=1,
        key_id=1,
        model="m",
        prices=Prices(1, 1),
        amount_micro=1,
        created_ms=0,
    )
