"""``POST /v1/responses`` through the real gateway and sandbox, with the openai SDK: translated
into a chat completion on the gated, billed path and back (plain and streamed)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.support.billing import expected_charge, usage_row
from tests.support.testdata import NON_TEE, TEE

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def _calls(upstream, since: int) -> list[dict]:
    """What the sandbox received since ``since``, but the gateway's own catalog and
    attestation polls (GETs)."""
    return [r for r in upstream.requests(since) if r["method"] != "GET"]


def _upstream_chat(upstream, since: int) -> dict:
    """The one request the sandbox received since ``since``: always a chat completion."""
    seen = _calls(upstream, since)
    assert [(r["method"], r["path"]) for r in seen] == [("POST", "/v1/chat/completions")]
    return seen[0]["json"]


def test_string_input_answers_a_response_and_the_upstream_saw_a_chat_completion(
    client, upstream, gateway
):
    since = upstream.requests_seen()
    raw = client.responses.with_raw_response.create(
        model=TEE, input="Say hello", instructions="Be brief.", max_output_tokens=50
    )
    resp = raw.parse()
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status == "completed" and resp.model == TEE and resp.store is False
    assert resp.previous_response_id is None and resp.instructions == "Be brief."
    assert "Sandbox reply" in resp.output_text
    assert resp.output[-1].type == "message" and resp.output[-1].content[0].annotations == []
    usage = resp.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-teegate-attestation-mode"]
    body = _upstream_chat(upstream, since)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ]
    assert body["max_completion_tokens"] == body["max_tokens"] == 50
    assert "input" not in body and "instructions" not in body
    # Billed as chat: a usage row settled from the upstream's usage at the captured prices.
    row = usage_row(gateway.db, raw.headers["x-request-id"])
    assert row["state"] == "settled" and row["source"] == "usage"
    assert row["prompt_tokens"] == usage.input_tokens
    assert row["completion_tokens"] == usage.output_tokens
    assert row["charge_micro"] == expected_charge(row)
    logged = [
        json.loads(line) for line in gateway.log_text().splitlines() if '"request_id"' in line
    ]
    (line,) = [
        e
        for e in logged
        if e.get("request_id") == raw.headers["x-request-id"] and e.get("event") == "request"
    ]
    assert line["path"] == "/v1/responses" and line["decision"] == "forwarded"


def test_message_items_with_parts_are_chat_messages(client, upstream):
    since = upstream.requests_seen()
    resp = client.responses.create(
        model=TEE,
        input=[
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello!", "annotations": []}],
            },
            {"role": "user", "content": "And again"},
        ],
    )
    assert resp.status == "completed"
    assert _upstream_chat(upstream, since)["messages"] == [
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And again"},
    ]


def test_function_tool_round_trip(client, upstream):
    since = upstream.requests_seen()
    first = client.responses.create(
        model=TEE, input="Weather in Paris?", tools=[WEATHER], tool_choice="required"
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    json.loads(calls[0].arguments)
    assert first.tools[0].name == "get_weather"
    sent = _upstream_chat(upstream, since)
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {k: WEATHER[k] for k in ("name", "description", "parameters", "strict")},
        }
    ]
    since = upstream.requests_seen()
    second = client.responses.create(
        model=TEE,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            *[item.model_dump(exclude_none=True) for item in first.output],
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        ],
        tools=[WEATHER],
    )
    assert second.status == "completed" and second.output_text  # text after the tool result
    messages = _upstream_chat(upstream, since)["messages"]
    assert messages[1]["role"] == "assistant"
    assert messages[1]["tool_calls"][0]["id"] == calls[0].call_id
    assert messages[2] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}


class City(BaseModel):
    name: str
    population: int


def test_parse_with_a_pydantic_model_sends_a_json_schema(client, upstream):
    since = upstream.requests_seen()
    parsed = client.responses.parse(model=TEE, input="A city", text_format=City)
    assert isinstance(parsed.output_parsed, City)
    fmt = _upstream_chat(upstream, since)["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "City"
    assert fmt["json_schema"]["strict"] is True


def test_max_output_tokens_reached_is_incomplete(client):
    resp = client.responses.create(model=TEE, input="Tell me a long story", max_output_tokens=2)
    assert resp.status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 2


def test_stream_helper_rebuilds_the_response(client, upstream):
    since = upstream.requests_seen()
    with client.responses.stream(
        model=TEE, input="Say hello", reasoning={"effort": "low"}
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    assert final.usage.output_tokens_details.reasoning_tokens > 0
    body = _upstream_chat(upstream, since)
    assert body["stream"] is True and body["reasoning_effort"] == "low"


def test_raw_stream_events_in_order_and_the_stream_is_billed_from_its_usage(client, gateway):
    raw = client.responses.with_raw_response.create(
        model=TEE, input="Weather?", tools=[WEATHER], stream=True
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.function_call_arguments.delta" in kinds
    i = kinds.index("response.function_call_arguments.done")
    assert kinds[i + 1] == "response.output_item.done"
    done = events[-1].response
    assert done.usage.total_tokens > 0 and done.output[-1].type == "function_call"
    row = usage_row(gateway.db, raw.headers["x-request-id"])
    assert row["source"] == "usage" and row["completion_tokens"] == done.usage.output_tokens
    assert row["prompt_tokens"] == done.usage.input_tokens


def test_a_non_confidential_model_is_refused_and_nothing_goes_upstream(client, upstream):
    since = upstream.requests_seen()
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=NON_TEE, input="hi")
    assert exc.value.body["code"] == "model_not_confidential"
    assert _calls(upstream, since) == []


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id", "keeps no conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "web_search"),
        ({"tools": [WEATHER, {"type": "file_search"}]}, "tools[1].type", "file_search"),
        ({"background": True}, "background", "stores nothing"),
        ({"truncation": "auto"}, "truncation", "disabled"),
        ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "stores no items"),
    ],
)
def test_refusals_name_the_parameter(http, upstream, extra, param, words):
    since = upstream.requests_seen()
    r = http.post("/v1/responses", json={"model": TEE, "input": "hi", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert r.headers["x-should-retry"] == "false"
    assert _calls(upstream, since) == []


def test_nothing_stored_to_retrieve(http, client):
    for method, path in [
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1"),
        ("GET", "/v1/responses/resp_1/input_items"),
        ("POST", "/v1/responses/resp_1/cancel"),
    ]:
        r = http.request(method, path)
        assert r.status_code == 404 and "stores no responses" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_1")
    assert http.get("/v1/responses").status_code == 405
    unknown = http.post("/v1/completions", json={}).json()["error"]["message"]
    assert "POST /v1/responses" in unknown


def test_store_true_is_answered_store_false(client):
    resp = client.responses.create(model=TEE, input="hi", store=True, metadata={"k": "v"})
    assert resp.store is False and resp.metadata == {"k": "v"}


def test_gzip_request_body_is_translated(gateway, upstream):
    import gzip

    since = upstream.requests_seen()
    body = gzip.compress(json.dumps({"model": TEE, "input": "hi"}).encode())
    r = httpx.post(
        f"{gateway.base_url}/v1/responses",
        content=body,
        headers={
            "authorization": f"Bearer {gateway.api_key}",
            "content-type": "application/json",
            "content-encoding": "gzip",
        },
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["object"] == "response"
    assert _upstream_chat(upstream, since)["messages"] == [{"role": "user", "content": "hi"}]


def test_stream_with_a_pydantic_format_parses_the_final_response(client):
    with client.responses.stream(model=TEE, input="A city", text_format=City) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, City)


def test_an_answer_for_another_model_fails_the_stream_and_the_plain_call(client, upstream):
    upstream.behaviour(answer_model="someone/else-TEE")
    seen = []
    with pytest.raises(openai.APIError) as exc:
        for event in client.responses.create(model=TEE, input="hi", stream=True):
            seen.append(event.type)
    assert seen == ["response.created", "response.in_progress", "response.failed"]
    assert exc.value.body["code"] == "upstream_model_mismatch"
    with pytest.raises(openai.APIStatusError) as exc:
        client.responses.create(model=TEE, input="hi")
    assert exc.value.status_code == 502
    assert exc.value.body["code"] == "upstream_model_mismatch"
