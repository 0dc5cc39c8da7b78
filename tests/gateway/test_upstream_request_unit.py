"""Below the processes: the built body, the plain-answer check, the stream model check."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import tflow, tutils

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError
from teegate.addons.flowstate import Route, Stage
from teegate.addons.schema import ALLOWED_FIELDS, parse_chat_request
from teegate.addons.streaming import StreamTally, _Relay
from teegate.addons.upstream import AnswerModelCheck
from tests.support.testdata import TEE

DEFAULTS = {"max_tokens": 1024, "temperature": 0.7, "top_p": 1.0, "max_depth": 400}
MSG = [{"role": "user", "content": "hi"}]


def _parse(**fields):
    return parse_chat_request(
        json.dumps({"model": TEE, "messages": MSG, **fields}).encode(), **DEFAULTS
    )


@given(
    limit=st.sampled_from(["max_tokens", "max_completion_tokens", "both", None]),
    value=st.integers(min_value=1, max_value=10**6),
    n=st.one_of(st.none(), st.integers(min_value=1, max_value=128)),
)
def test_the_upstream_never_reads_a_larger_limit_than_was_paid_for(limit, value, n):
    fields: dict = {} if n is None else {"n": n}
    if limit == "both":
        fields |= {"max_tokens": value, "max_completion_tokens": value}
    elif limit is not None:
        fields[limit] = value
    req = _parse(**fields)
    body = json.loads(req.upstream_body(include_usage=True))
    budget = value if limit is not None else DEFAULTS["max_tokens"]
    assert body["max_tokens"] == body["max_completion_tokens"] == budget
    assert req.output_budget == budget * (n or 1)
    assert set(body) <= ALLOWED_FIELDS


def test_operator_fields_need_the_configuration():
    raw = json.dumps({"model": TEE, "messages": MSG, "x_hint": 1}).encode()
    with pytest.raises(GatewayError) as exc:
        parse_chat_request(raw, **DEFAULTS)
    assert (exc.value.code, exc.value.param) == ("unsupported_parameter", "x_hint")
    req = parse_chat_request(raw, **DEFAULTS, extra_fields=frozenset({"x_hint"}))
    assert json.loads(req.upstream_body(include_usage=False))["x_hint"] == 1


def _answered(model: object, status: int = 200, content_type: str = "application/json"):
    f = tflow.tflow(
        req=tutils.treq(method=b"POST", path=b"/v1/chat/completions"),
        resp=tutils.tresp(
            status_code=status,
            content=json.dumps({"model": model, "choices": []}).encode(),
            headers=((b"content-type", content_type.encode()),),
        ),
    )
    flowstate.set_route(f, Route.CHAT)
    flowstate.passed(f, Stage.UPSTREAM)
    flowstate.set_upstream_model(f, TEE)
    AnswerModelCheck().response(f)
    return f


@pytest.mark.parametrize("model", ["other/model", None, 7, TEE.lower(), TEE + " "])
def test_a_plain_answer_naming_another_model_becomes_502(model):
    f = _answered(model)
    assert f.response.status_code == 502
    assert f.response.json()["error"]["code"] == "upstream_model_mismatch"
    assert flowstate.error_code(f) == "upstream_model_mismatch"


def test_a_matching_answer_and_upstream_errors_are_left_alone():
    assert _answered(TEE).response.status_code == 200
    assert _answered("other", status=503).response.status_code == 503


def _chunk(model: object, content: str = "x") -> bytes:
    doc = {"model": model, "choices": [{"index": 0, "delta": {"content": content}}]}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _run(pieces: list[bytes]) -> tuple[bytes, StreamTally, list[object]]:
    seen: list[object] = []
    tally = StreamTally()
    relay = _Relay(tally, True, None, model=TEE, on_mismatch=seen.append)
    out = b"".join(b"".join(relay(p)) for p in [*pieces, b""])
    return out, tally, seen


def test_a_matching_stream_is_relayed_byte_for_byte_even_when_split():
    stream = b": ping\n\n" + _chunk(TEE, "a") + _chunk(TEE, "b") + b"data: [DONE]\n\n"
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    out, tally, seen = _run(pieces)
    assert out == stream and not tally.model_mismatch and seen == []


@pytest.mark.parametrize(
    "first",
    [_chunk("other/model", "SECRET"), b"data: [DONE]\n\n", b"data: not json\n\n", _chunk(None)],
)
def test_a_stream_from_another_model_relays_only_the_error_event(first):
    stream = first + _chunk(TEE, "SECRET") + b"data: [DONE]\n\n"
    out, tally, seen = _run([stream[:5], stream[5:]])
    assert b"SECRET" not in out and b"[DONE]" not in out
    (event,) = [e for e in out.split(b"\n\n") if e]
    assert json.loads(event.removeprefix(b"data: "))["error"]["code"] == "upstream_model_mismatch"
    assert tally.model_mismatch and tally.generated_bytes == 0 and len(seen) == 1


def test_an_unreadable_stream_fails_the_check():
    tally = StreamTally(opaque=True)
    relay = _Relay(tally, True, None, model=TEE)
    out = b"".join(relay(_chunk(TEE, "SECRET")))
    assert b"SECRET" not in out and tally.model_mismatch
