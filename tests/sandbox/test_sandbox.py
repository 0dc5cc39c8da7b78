"""The sandbox upstream, exercised as a real process over HTTP (module-scoped, reset per test)."""

from __future__ import annotations

import base64
import json
import math
import time
from decimal import ROUND_CEILING, Decimal
from typing import Any

import httpx
import pytest

from tests.support.sandbox_proc import SandboxProc

MODEL = "zai-org/GLM-5.1-TEE"
USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, wörld!"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
OTHER_TOOL = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}
MICRO = Decimal("0.000001")


def documented_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The sandbox's documented rule: sum of ceil(utf8 bytes / 4) + 4 per message."""
    return sum(math.ceil(len(m["content"].encode()) / 4) + 4 for m in messages)


def chat(api: httpx.Client, **body: Any) -> httpx.Response:
    return api.post("/chat/completions", json={"model": MODEL, "messages": USER, **body})


def stream_events(api: httpx.Client, **body: Any) -> list[Any]:
    """Every SSE ``data:`` payload (parsed JSON, or the literal "[DONE]"), in order."""
    events: list[Any] = []
    with api.stream(
        "POST", "/chat/completions", json={"model": MODEL, "messages": USER, "stream": True, **body}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def content_of(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if e != "[DONE]" and e["choices"]
    )


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- catalog ---------------------------------------------------------------------------------


def test_catalog_lists_every_tee_model_as_confidential(
    api: httpx.Client, tee_spec: dict[str, Any]
) -> None:
    body = api.get("/models").json()
    assert body["object"] == "list"
    rows = {row["id"]: row for row in body["data"]}
    tee_ids = [m["id"] for m in tee_spec["models"]]
    assert len(tee_ids) == 16
    assert set(rows) == set(tee_ids) | set(tee_spec["non_tee_examples"])
    for spec in tee_spec["models"]:
        row = rows[spec["id"]]
        assert row["object"] == "model"
        assert row["confidential_compute"] is True
        assert row["owned_by"] == spec["id"].split("/")[0]
        assert isinstance(row["created"], int)
        assert row["context_length"] == spec["context_length"]
        assert row["max_output_length"] == min(spec["context_length"], 65536)
        assert row["input_modalities"] == ["text"] and row["output_modalities"] == ["text"]
        features = set(row["supported_features"])
        assert {"json_mode", "structured_outputs", "tools"} <= features
        assert ("reasoning" in features) == ("reasoning" in spec["features"])
        assert "json-mode" not in features
    for model_id in tee_spec["non_tee_examples"]:
        assert rows[model_id]["confidential_compute"] is False
        assert set(rows[model_id]["pricing"]) == {"prompt", "completion", "input_cache_read"}


def ceil_micro(value: Decimal) -> Decimal:
    return value.quantize(MICRO, rounding=ROUND_CEILING)


def test_prices_times_markup_round_up_to_the_public_prices(
    api: httpx.Client, tee_spec: dict[str, Any]
) -> None:
    markup = Decimal(tee_spec["markup"])
    rows = {row["id"]: row for row in api.get("/models").json()["data"]}
    for spec in tee_spec["models"]:
        pricing = rows[spec["id"]]["pricing"]
        assert all(isinstance(v, str) for v in pricing.values())
        public_in = Decimal(spec["price_usd_per_1m"]["input"])
        public_out = Decimal(spec["price_usd_per_1m"]["output"])
        served = {k: Decimal(v) for k, v in pricing.items()}
        # Served before the markup, so strictly cheaper than public...
        assert served["prompt"] < public_in and served["completion"] < public_out
        # ...and the gateway's markup (rounded up to micro-USD) gives the public number back.
        assert ceil_micro(served["prompt"] * markup) == public_in
        assert ceil_micro(served["completion"] * markup) == public_out
        assert ceil_micro(served["input_cache_read"] * markup) == ceil_micro(public_in / 2)


def test_single_model_lookup(api: httpx.Client) -> None:
    row = api.get(f"/models/{MODEL}").json()
    assert row["id"] == MODEL and row["confidential_compute"] is True
    error = assert_error(api.get("/models/nobody/nothing-TEE"), 404)
    assert error["code"] == "model_not_found"


# --- auth and counters -------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "sandbox-upstream-key"])
def test_api_needs_the_bearer_key(sandbox: SandboxProc, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    with httpx.Client(base_url=sandbox.api_base, headers=headers) as anonymous:
        for response in (
            anonymous.get("/models"),
            anonymous.post("/chat/completions", json={"model": MODEL, "messages": USER}),
            anonymous.post("/embeddings", json={"input": "x"}),
        ):
            assert assert_error(response, 401)["code"] == "invalid_api_key"
    stats = sandbox.stats()
    assert stats["total"] == 3  # refused requests are still counted
    assert stats["chat"] == []  # but never reach the chat handler


def test_counters_and_dummy_routes(sandbox: SandboxProc, api: httpx.Client) -> None:
    embedding = api.post("/embeddings", json={"model": MODEL, "input": "secret"})
    assert embedding.status_code == 200 and embedding.json()["path"] == "/v1/embeddings"
    assert api.post("/images/generations", json={"prompt": "x"}).status_code == 200
    assert api.get("/files").status_code == 200
    assert chat(api).status_code == 200
    api.get("/models")
    sandbox.behaviour(cached_tokens=1)  # control calls are not counted
    stats = sandbox.stats()
    assert stats["total"] == 5
    assert stats["by_route"] == {
        "POST /v1/embeddings": 1,
        "POST /v1/images/generations": 1,
        "GET /v1/files": 1,
        "POST /v1/chat/completions": 1,
        "GET /v1/models": 1,
    }
    (entry,) = stats["chat"]
    assert entry["body"] == {"model": MODEL, "messages": USER}
    assert entry["headers"]["authorization"] == f"Bearer {sandbox.api_key}"
    assert all(name == name.lower() for name in entry["headers"])
    sandbox.reset()
    assert sandbox.stats() == {
        "total": 0,
        "by_route": {},
        "chat": [],
        "requests": [],
        "requests_seen": 0,
        "held": 0,
    }


def test_every_request_is_recorded_as_received(sandbox: SandboxProc) -> None:
    """Method, raw target, headers (duplicates kept) and body, also for refused requests."""
    raw = b'{"model": "m", "x": "\\ud800"}'
    with httpx.Client(base_url=sandbox.api_base) as anonymous:
        anonymous.post(
            "/anything/at/all?a=%41&b",
            content=raw,
            headers=[("X-Dup", "1"), ("x-dup", "2"), ("content-type", "text/plain")],
        )
        anonymous.request("PATCH", "/files", content=b"\xff\x00")
    first, second = sandbox.requests()
    assert (first["method"], first["path"], first["query"]) == (
        "POST",
        "/v1/anything/at/all",
        "a=%41&b",
    )
    assert first["target"] == "/v1/anything/at/all?a=%41&b"
    assert ["X-Dup", "1"] in first["headers"] and ["x-dup", "2"] in first["headers"]
    assert base64.b64decode(first["body_b64"]) == raw and first["body_text"] == raw.decode()
    assert first["json_ok"] and first["json"] == {"model": "m", "x": "\ud800"}
    assert (second["method"], second["query"], second["body_size"]) == ("PATCH", None, 2)
    assert base64.b64decode(second["body_b64"]) == b"\xff\x00"
    assert second["body_text"] is None and not second["json_ok"]
    sandbox.reset()
    assert sandbox.requests() == []


def test_chat_log_keeps_the_last_200(sandbox: SandboxProc, api: httpx.Client) -> None:
    for i in range(205):
        chat(api, user=f"u{i}")
    stats = sandbox.stats()
    assert stats["by_route"]["POST /v1/chat/completions"] == 205
    assert [e["body"]["user"] for e in stats["chat"]] == [f"u{i}" for i in range(5, 205)]


def test_completion_ids_count_up_and_reset(sandbox: SandboxProc, api: httpx.Client) -> None:
    assert [chat(api).json()["id"] for _ in range(3)] == [f"chatcmpl-sbx-{i}" for i in (1, 2, 3)]
    sandbox.reset()
    assert chat(api).json()["id"] == "chatcmpl-sbx-1"


# --- chat completions ---------------------------------------------------------------------------


def test_plain_answer_and_usage(api: httpx.Client) -> None:
    body = chat(api).json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert MODEL in choice["message"]["content"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == documented_prompt_tokens(USER)
    assert usage["completion_tokens"] == 8  # --chunks default
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_answers_are_deterministic(api: httpx.Client) -> None:
    first, second = chat(api).json(), chat(api).json()
    assert first["choices"] == second["choices"] and first["usage"] == second["usage"]


def test_multipart_content_counts_text_parts(api: httpx.Client) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "abcdefgh"},
                {"type": "image_url", "image_url": {"url": "data:,xyz"}},
                {"type": "text", "text": "i"},
            ],
        }
    ]
    body = api.post("/chat/completions", json={"model": MODEL, "messages": messages}).json()
    assert body["usage"]["prompt_tokens"] == math.ceil(9 / 4) + 4


def test_max_tokens_cuts_the_answer(api: httpx.Client) -> None:
    full = chat(api).json()["choices"][0]["message"]["content"]
    for key in ("max_tokens", "max_completion_tokens"):
        body = chat(api, **{key: 3}).json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3
        content = body["choices"][0]["message"]["content"]
        assert full.startswith(content) and len(content) < len(full)
    assert chat(api, max_tokens=8).json()["choices"][0]["finish_reason"] == "stop"


def test_stream_matches_the_plain_answer(api: httpx.Client) -> None:
    plain = chat(api).json()["choices"][0]["message"]["content"]
    events = stream_events(api)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content_chunks = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == 8
    assert [c["choices"][0]["finish_reason"] for c in content_chunks] == [None] * 7 + ["stop"]
    assert content_of(events) == plain
    assert all("usage" not in c for c in chunks)  # not asked for


def test_stream_usage_chunk_when_asked(api: httpx.Client) -> None:
    events = stream_events(api, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == documented_prompt_tokens(USER)
    assert usage_chunk["usage"]["completion_tokens"] == 8
    assert all("usage" not in e for e in events[:-2])


def test_stream_max_tokens(api: httpx.Client) -> None:
    events = stream_events(api, max_tokens=2, stream_options={"include_usage": True})
    assert events[-2]["usage"]["completion_tokens"] == 2
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_tool_call(api: httpx.Client) -> None:
    body = chat(api, tools=[WEATHER_TOOL, OTHER_TOOL]).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "sandbox"}
    assert body["usage"]["completion_tokens"] >= 1


def test_tool_choice_named_and_none(api: httpx.Client) -> None:
    named = {"type": "function", "function": {"name": "noop"}}
    body = chat(api, tools=[WEATHER_TOOL, OTHER_TOOL], tool_choice=named).json()
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "noop" and json.loads(call["function"]["arguments"]) == {}
    plain = chat(api, tools=[WEATHER_TOOL], tool_choice="none").json()["choices"][0]
    assert plain["finish_reason"] == "stop" and MODEL in plain["message"]["content"]
    unknown = {"type": "function", "function": {"name": "missing"}}
    assert_error(chat(api, tools=[WEATHER_TOOL], tool_choice=unknown), 400)


def test_streamed_tool_call(api: httpx.Client) -> None:
    events = stream_events(api, tools=[WEATHER_TOOL], stream_options={"include_usage": True})
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    first = deltas[0]["tool_calls"][0]
    assert deltas[0]["role"] == "assistant"
    assert first["function"]["name"] == "get_weather" and first["id"]
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)
    assert json.loads(arguments) == {"city": "sandbox"}
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-2]["usage"]["completion_tokens"] == len(deltas) - 1


def test_json_modes(api: httpx.Client) -> None:
    body = chat(api, response_format={"type": "json_object"}).json()
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    content = chat(api, response_format=fmt).json()["choices"][0]["message"]["content"]
    assert json.loads(content) == {"name": "sandbox", "age": 1}
    streamed = content_of(stream_events(api, response_format=fmt))
    assert json.loads(streamed) == {"name": "sandbox", "age": 1}


@pytest.mark.parametrize(
    "body, status",
    [
        ({"messages": USER}, 400),
        ({"model": MODEL}, 400),
        ({"model": MODEL, "messages": []}, 400),
        ({"model": MODEL, "messages": USER, "max_tokens": 0}, 400),
        ({"model": MODEL, "messages": USER, "response_format": {"type": "yaml"}}, 400),
        ({"model": "nobody/unknown-TEE", "messages": USER}, 404),
    ],
)
def test_bad_requests(api: httpx.Client, body: dict[str, Any], status: int) -> None:
    assert_error(api.post("/chat/completions", json=body), status)


def test_invalid_json_is_400_and_logged(sandbox: SandboxProc, api: httpx.Client) -> None:
    assert_error(api.post("/chat/completions", content=b"{not json"), 400)
    assert sandbox.stats()["chat"][0]["body"] is None


# --- misbehaviour switches ------------------------------------------------------------------------


def test_omit_usage(sandbox: SandboxProc, api: httpx.Client) -> None:
    sandbox.behaviour(omit_usage=True)
    assert "usage" not in chat(api).json()
    events = stream_events(api, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    assert all(e["choices"] and "usage" not in e for e in events[:-1])


def test_usage_with_choices(sandbox: SandboxProc, api: httpx.Client) -> None:
    sandbox.behaviour(usage_with_choices=True)
    events = stream_events(api, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"]["completion_tokens"] == 8
    assert all(e["choices"] for e in events[:-1])


@pytest.mark.parametrize("after", [0, 3, 8])
def test_stop_after_chunks_cuts_the_connection(
    sandbox: SandboxProc, api: httpx.Client, after: int
) -> None:
    sandbox.behaviour(stop_after_chunks=after)
    received: list[str] = []
    body = {"model": MODEL, "messages": USER, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        with api.stream("POST", "/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received.append(line)
    assert "data: [DONE]" not in received
    assert len(received) == 1 + after  # the role chunk, then `after` content chunks
    assert chat(api).status_code == 200  # the server itself is fine


def test_delay_ms(sandbox: SandboxProc, api: httpx.Client) -> None:
    sandbox.behaviour(delay_ms=300)
    start = time.monotonic()
    assert chat(api).status_code == 200
    assert time.monotonic() - start >= 0.3


def test_chunk_delay_ms(sandbox: SandboxProc, api: httpx.Client) -> None:
    sandbox.behaviour(chunk_delay_ms=40)
    start = time.monotonic()
    events = stream_events(api)
    assert events[-1] == "[DONE]"
    assert time.monotonic() - start >= 8 * 0.04


@pytest.mark.parametrize("status", [429, 500, 503])
def test_forced_status(sandbox: SandboxProc, api: httpx.Client, status: int) -> None:
    sandbox.behaviour(status=status)
    assert assert_error(chat(api), status)["code"] == "sandbox_forced"
    assert_error(chat(api, stream=True), status)
    assert len(sandbox.stats()["chat"]) == 2  # still recorded: the request did arrive
    sandbox.behaviour(status=None)
    assert chat(api).status_code == 200


def test_flags_and_removals(sandbox: SandboxProc, api: httpx.Client) -> None:
    other = "Qwen/Qwen3-32B-TEE"
    sandbox.behaviour(flags={MODEL: False, "Qwen/Qwen3-32B": True}, remove_models=[other])
    rows = {row["id"]: row for row in api.get("/models").json()["data"]}
    assert rows[MODEL]["confidential_compute"] is False
    assert rows["Qwen/Qwen3-32B"]["confidential_compute"] is True
    assert other not in rows
    assert api.get(f"/models/{other}").status_code == 404
    assert api.get(f"/models/{MODEL}").json()["confidential_compute"] is False
    # Hiding a model from the catalog does not stop the upstream from serving it.
    hidden = api.post("/chat/completions", json={"model": other, "messages": USER})
    assert hidden.status_code == 200
    sandbox.reset()
    rows = {row["id"]: row for row in api.get("/models").json()["data"]}
    assert rows[MODEL]["confidential_compute"] is True and other in rows


def test_cached_tokens(sandbox: SandboxProc, api: httpx.Client) -> None:
    sandbox.behaviour(cached_tokens=5)
    assert chat(api).json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 5}
    events = stream_events(api, stream_options={"include_usage": True})
    assert events[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 5}


def test_malformed_rows(sandbox: SandboxProc, api: httpx.Client) -> None:
    clean = api.get("/models").json()["data"]
    sandbox.behaviour(malformed_rows=True)
    data = api.get("/models").json()["data"]
    extra = data[len(clean) :]
    assert data[: len(clean)] == clean
    assert any(isinstance(r, dict) and "id" not in r for r in extra)
    assert any(isinstance(r, dict) and r.get("pricing", {}).get("prompt") == "abc" for r in extra)
    assert any(isinstance(r, dict) and r.get("confidential_compute") == "true" for r in extra)


@pytest.mark.parametrize("status", [500, 503])
def test_models_status(sandbox: SandboxProc, api: httpx.Client, status: int) -> None:
    sandbox.behaviour(models_status=status)
    assert_error(api.get("/models"), status)
    assert_error(api.get(f"/models/{MODEL}"), status)
    assert chat(api).status_code == 200


def test_behaviour_is_validated(sandbox: SandboxProc) -> None:
    for bad in ({"omit_usag": True}, {"delay_ms": "5"}, {"status": 42}, {"flags": {"x": "yes"}}):
        with pytest.raises(httpx.HTTPStatusError) as info:
            sandbox.behaviour(**bad)
        assert info.value.response.status_code == 400
    merged = sandbox.behaviour(cached_tokens=2)
    merged = sandbox.behaviour(omit_usage=True)
    assert merged["cached_tokens"] == 2 and merged["omit_usage"] is True


def test_long_prompt_is_accepted_and_counted(api: httpx.Client) -> None:
    messages = [{"role": "user", "content": "é" * 1_500_000}]  # 3 MB of UTF-8
    body = api.post("/chat/completions", json={"model": MODEL, "messages": messages}).json()
    assert body["usage"]["prompt_tokens"] == 3_000_000 // 4 + 4


def test_default_flavour_is_not_chutes(api: httpx.Client) -> None:
    rows = api.get("/models").json()["data"]
    assert all("chute_id" not in row for row in rows)
    base = str(api.base_url).removesuffix("/v1/")
    assert httpx.get(f"{base}/e2e/instances/x", headers=api.headers).status_code == 404
