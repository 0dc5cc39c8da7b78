"""Chat completions through the real gateway and sandbox upstream, with the openai SDK."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.clients import chat_count
from tests.support.testdata import TEE

MSG = [{"role": "user", "content": "Say hello"}]


def test_tee_model_answers(client, upstream):
    raw = client.chat.completions.with_raw_response.create(model=TEE, messages=MSG)
    completion = raw.parse()
    assert completion.model == TEE
    assert "Sandbox reply" in completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0
    assert raw.headers["x-request-id"].startswith("req_")
    assert chat_count(upstream) == 1


def test_upstream_sees_reserialized_request_with_defaults_and_its_own_key(
    client, upstream, gateway
):
    client.chat.completions.create(
        model=TEE,
        messages=MSG,
        seed=7,
        stop=["\n\n"],
        user="u-1",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto",
        extra_body={"logprobs": False, "chat_template_kwargs": {"kept": True}},
    )
    seen = upstream.stats()["chat"][-1]
    body, headers = seen["body"], seen["headers"]
    assert body["model"] == TEE
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (1024, 0.7, 1.0)
    assert body["seed"] == 7 and body["stop"] == ["\n\n"] and body["user"] == "u-1"
    assert body["tools"][0]["function"]["name"] == "f" and body["tool_choice"] == "auto"
    assert body["chat_template_kwargs"] == {"kept": True} and body["logprobs"] is False
    assert headers["authorization"] == f"Bearer {upstream.api_key}"
    assert gateway.api_key not in json.dumps(headers)
    assert not any(h.startswith(("x-stainless", "proxy-", "openai-")) for h in headers)


def test_client_values_are_not_overridden(client, upstream):
    client.chat.completions.create(
        model=TEE, messages=MSG, max_tokens=5, temperature=0.0, top_p=0.5
    )
    body = upstream.stats()["chat"][-1]["body"]
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (5, 0.0, 0.5)


def test_non_tee_model_is_refused_locally_with_a_suggestion(client, upstream):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="deepseek-ai/DeepSeek-V3", messages=MSG)
    err = exc.value.body
    assert exc.value.status_code == 400
    assert err["code"] == "model_not_confidential" and err["param"] == "model"
    assert err["message"] == (
        "Model 'deepseek-ai/DeepSeek-V3' is not Confidential Compute. "
        "Use 'deepseek-ai/DeepSeek-V3-0324-TEE' instead."
    )
    assert chat_count(upstream) == 0


@pytest.mark.parametrize(
    "model",
    [
        "deepseek-ai/deepseek-v3.2-tee",
        " deepseek-ai/DeepSeek-V3.2-TEE",
        "deepseek-ai/DeepSeek-V3.2-TEE ",
    ],
)
def test_gate_matches_exactly(client, upstream, model):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=MSG)
    assert exc.value.body["code"] == "model_not_confidential"
    assert chat_count(upstream) == 0


def test_no_plausible_suggestion_points_to_the_model_list(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="zzz/completely-unrelated", messages=MSG)
    assert "GET /v1/models" in exc.value.body["message"]


async def test_async_stream_arrives_in_chunks_without_usage(aclient, upstream):
    stream = await aclient.chat.completions.create(model=TEE, messages=MSG, stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Sandbox reply")
    assert len(chunks) > 3
    assert all(c.usage is None for c in chunks)  # the usage chunk the gateway asked for is gone
    sent = upstream.stats()["chat"][-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}


def test_stream_with_usage_requested_keeps_it(client):
    stream = client.chat.completions.create(
        model=TEE, messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stream_is_not_buffered(client, upstream):
    """The first token reaches the client while the upstream is still holding the rest."""
    upstream.behaviour(hold_after_chunks=1)
    stream = client.chat.completions.create(model=TEE, messages=MSG, stream=True)
    it = iter(stream)
    first, second = next(it), next(it)  # would block (until timeout) if the gateway buffered
    assert first.choices[0].delta.role == "assistant"
    assert second.choices[0].delta.content
    assert upstream.stats()["held"] == 1  # the upstream has provably not finished
    upstream.release()
    rest = list(it)
    assert rest and rest[-1].choices[0].finish_reason == "stop"


def test_tools_and_json_mode_pass_through(client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    done = client.chat.completions.create(model=TEE, messages=MSG, tools=tools)
    call = done.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    done = client.chat.completions.create(
        model=TEE, messages=MSG, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(done.choices[0].message.content), dict)


def test_capabilities_are_checked_against_the_catalog(client, upstream):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="test/Tiny-NoTools-TEE", messages=MSG, tools=tools)
    assert exc.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="test/Tiny-NoTools-TEE", messages=MSG, response_format={"type": "json_object"}
        )
    assert exc.value.body["param"] == "response_format"
    assert chat_count(upstream) == 0


def test_prompt_that_cannot_fit_the_context_is_refused(client, upstream):
    huge = [{"role": "user", "content": "word " * 40_000}]  # >= 25k tokens by any tokenizer
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="test/Tiny-NoTools-TEE", messages=huge)
    assert exc.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="test/Tiny-NoTools-TEE", messages=MSG, max_tokens=5000)
    assert exc.value.body["code"] == "context_length_exceeded"
    assert chat_count(upstream) == 0
    client.chat.completions.create(model="test/Tiny-NoTools-TEE", messages=MSG, max_tokens=3000)
    assert chat_count(upstream) == 1


def test_upstream_error_reaches_the_client(client, upstream):
    upstream.behaviour(status=500)
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model=TEE, messages=MSG)
    assert exc.value.status_code == 500
    # The upstream's own envelope, not one the gateway made up (its code would be internal_error).
    assert exc.value.body["code"] == "sandbox_forced"
