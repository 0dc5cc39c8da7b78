"""The Responses API translation: request to chat completion, chat answer (plain and streamed)
to Responses objects and events, each checked against the openai SDK's own models."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import taddons, tflow, tutils
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from teegate.addons import flowstate
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.errors import GatewayError
from teegate.addons.flowstate import Route, Stage
from teegate.addons.responses import ResponsesIn, ResponsesOut
from teegate.addons.responses_answer import response_from_chat
from teegate.addons.responses_api import (
    ResponsesCall,
    passthrough_fields,
    responses_param,
    to_chat,
)
from teegate.addons.responses_stream import ResponsesStream
from teegate.addons.routes import Router
from teegate.addons.schema import parse_chat_request
from teegate.config import LimitSettings, Settings

M = "org/model-TEE"
EVENTS = TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}


def chat(doc: dict) -> dict:
    body, _ = to_chat({"model": M, **doc})
    return body


# -- request --------------------------------------------------------------------------------


def test_the_translated_request_passes_the_chat_allow_list():
    body, call = to_chat(
        {
            "model": M,
            "instructions": "sys",
            "input": "hi",
            "max_output_tokens": 9,
            "temperature": 0.1,
            "top_p": 0.5,
            "stream": True,
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "f"},
            "parallel_tool_calls": False,
            "text": {"format": {"type": "json_object"}, "verbosity": "low"},
            "reasoning": {"effort": "high", "summary": "auto"},
            "user": "u",
            "store": True,
            "metadata": {"k": "v"},
            "truncation": "disabled",
            "include": ["reasoning.encrypted_content"],
            "stream_options": {"include_obfuscation": False},
            "previous_response_id": None,
        }
    )
    req = parse_chat_request(
        json.dumps(body).encode(), max_tokens=100, temperature=1.0, top_p=1.0, max_depth=64
    )
    assert req.budget == 9 and req.stream is True
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]
    assert body["stream_options"] == {"include_usage": True}  # the final event's usage
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object"}, "strict": True},
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["response_format"] == {"type": "json_object"} and body["verbosity"] == "low"
    assert body["reasoning_effort"] == "high" and body["parallel_tool_calls"] is False
    assert "metadata" not in body and "store" not in body  # echoed, never sent upstream
    assert call.echo["metadata"] == {"k": "v"} and not call.logprobs


def test_items_become_messages_tool_calls_and_tool_results():
    body = chat(
        {
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "look"},
                        {
                            "type": "input_image",
                            "image_url": "data:image/png;base64,AA",
                            "detail": "low",
                        },
                    ],
                },
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "think"}],
                },
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "f",
                    "arguments": "{}",
                    "id": "fc_1",
                },
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "two"}],
                },
            ]
        }
    )
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,AA", "detail": "low"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "think",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]


def test_chat_sampling_fields_pass_as_they_are_and_routing_fields_never():
    body = chat({"input": "x", "seed": 3, "top_k": 5, "chat_template_kwargs": {"a": 1}})
    assert (body["seed"], body["top_k"], body["chat_template_kwargs"]) == (3, 5, {"a": 1})
    for name in ("messages", "max_tokens", "n", "fallbacks", "best_of", "logprobs"):
        with pytest.raises(GatewayError) as exc:
            chat({"input": "x", name: 1})
        assert exc.value.param == name
    extra = passthrough_fields(frozenset({"my_field", "messages", "provider"}))
    assert "my_field" in extra and not {"messages", "provider"} & extra


def test_json_schema_format_and_logprobs():
    body, call = to_chat(
        {
            "model": M,
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "n", "schema": {}, "strict": True}},
            "top_logprobs": 2,
        }
    )
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": {}, "strict": True},
    }
    assert body["logprobs"] is True and body["top_logprobs"] == 2 and call.logprobs


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "p"}}, "prompt"),
        ({"background": True}, "background"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"truncation": "auto"}, "truncation"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [{"type": "mcp", "server_url": "x"}]}, "tools[0].type"),
        ({"tools": [{**TOOL, "defer": 1}]}, "tools[0].defer"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"input": [{"type": "web_search_call", "id": "w"}]}, "input[0].type"),
        ({"input": [{"type": "item_reference", "id": "m"}]}, "input[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].file_id",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"reasoning": {"effort": "low", "budget": 3}}, "reasoning.budget"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"functions": []}, "functions"),
        ({"input": []}, "input"),
        ({"input": None, "instructions": "only"}, "input"),
    ],
)
def test_refusals_name_the_parameter(doc, param):
    with pytest.raises(GatewayError) as exc:
        to_chat({"model": M, "input": "hi", **doc})
    assert exc.value.status == 400 and exc.value.param == param


# -- the plain answer -------------------------------------------------------------------------


def completion(message: dict, finish: str = "stop", **extra) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": M,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, **extra}],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
    }


def call(**doc) -> ResponsesCall:
    return to_chat({"model": M, "input": "x", **doc})[1]


def test_a_text_answer_is_a_valid_response():
    out = response_from_chat(
        call(instructions="sys", tools=[TOOL], metadata={"a": "b"}),
        completion({"role": "assistant", "content": "hello", "reasoning_content": "hm"}),
        {"temperature": 0.7, "top_p": 1.0, "max_output_tokens": 1024},
    )
    resp = Response.model_validate(out)
    assert resp.output_text == "hello" and resp.status == "completed"
    assert [o.type for o in resp.output] == ["reasoning", "message"]
    assert resp.output[0].content[0].text == "hm"
    assert resp.usage.input_tokens_details.cached_tokens == 4
    assert resp.usage.output_tokens_details.reasoning_tokens == 2
    assert resp.usage.total_tokens == 15 and resp.store is False
    assert resp.tools[0].name == "f" and resp.instructions == "sys"
    assert resp.temperature == 0.7 and resp.max_output_tokens == 1024
    assert resp.metadata == {"a": "b"}


def test_tool_calls_and_length_become_function_calls_and_incomplete():
    tc = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    out = response_from_chat(
        call(), completion({"role": "assistant", "content": None, "tool_calls": [tc]}, "length")
    )
    resp = Response.model_validate(out)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    (fc,) = resp.output
    assert (fc.type, fc.call_id, fc.name, fc.arguments) == (
        "function_call",
        "call_1",
        "f",
        '{"a":1}',
    )


def test_logprobs_are_carried_when_asked():
    lp = {
        "content": [
            {
                "token": "hi",
                "logprob": -0.5,
                "bytes": None,
                "top_logprobs": [{"token": "hi", "logprob": -0.5}],
            }
        ]
    }
    out = response_from_chat(
        call(top_logprobs=1), completion({"role": "assistant", "content": "hi"}, logprobs=lp)
    )
    part = Response.model_validate(out).output[0].content[0]
    assert part.logprobs[0].token == "hi" and part.logprobs[0].bytes == [104, 105]


# -- the streamed answer ----------------------------------------------------------------------


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    doc = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": M}
    doc["choices"] = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    )
    if usage:
        doc["usage"] = usage
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def events(data: bytes, *, piecewise: bool = False) -> list:
    stream = ResponsesStream(call(), {"temperature": 1.0})
    pieces = [data[i : i + 1] for i in range(len(data))] if piecewise else [data]
    out = b"".join(stream.feed(p) for p in pieces) + stream.close()
    parsed = []
    for block in out.decode().split("\n\n"):
        if block:
            kind, data_line = block.split("\n")
            ev = EVENTS.validate_python(json.loads(data_line.removeprefix("data: ")))
            assert kind == f"event: {ev.type}"
            parsed.append(ev)
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    return parsed


TEXT_STREAM = (
    chunk({"role": "assistant", "reasoning_content": "th"})
    + chunk({"reasoning_content": "ink"})
    + chunk({"content": "Hel"})
    + chunk({"content": "lo"}, "stop")
    + chunk(None, usage=USAGE)
    + b"data: [DONE]\n\n"
)


def test_a_text_stream_becomes_the_responses_events():
    evs = events(TEXT_STREAM)
    assert [e.type for e in evs] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = evs[-1].response
    assert final.output_text == "Hello" and final.usage.total_tokens == 7
    assert final.output[0].content[0].text == "think"
    assert evs[2].item.id == final.output[0].id and evs[9].item.id == final.output[1].id


def test_events_do_not_depend_on_how_the_bytes_were_split():
    whole = [e.type for e in events(TEXT_STREAM)]
    assert [e.type for e in events(TEXT_STREAM, piecewise=True)] == whole


def test_parallel_tool_calls_stream_as_function_call_items():
    data = (
        chunk(
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "a",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    }
                ],
            }
        )
        + chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "b",
                        "type": "function",
                        "function": {"name": "g", "arguments": "{"},
                    }
                ]
            }
        )
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
        + chunk({"tool_calls": [{"index": 1, "function": {"arguments": "}"}}]}, "tool_calls")
        + chunk(None, usage=USAGE)
    )
    evs = events(data)
    final = evs[-1].response
    assert evs[-1].type == "response.completed"
    assert [(o.call_id, o.name, o.arguments) for o in final.output] == [
        ("a", "f", "{}"),
        ("b", "g", "{}"),
    ]
    done = [e for e in evs if e.type == "response.function_call_arguments.done"]
    assert [d.arguments for d in done] == ["{}", "{}"]


def test_length_ends_incomplete():
    evs = events(chunk({"content": "a"}, "length") + chunk(None, usage=USAGE))
    assert evs[-1].type == "response.incomplete"
    assert evs[-1].response.incomplete_details.reason == "max_output_tokens"


def test_an_error_event_fails_the_response_and_nothing_after_it_is_sent():
    err = {
        "error": {
            "message": "mismatch",
            "type": "api_error",
            "param": None,
            "code": "upstream_model_mismatch",
        },
        "status": 502,
    }
    data = chunk({"content": "a"}) + b"data: " + json.dumps(err).encode() + b"\n\n"
    evs = events(data + chunk({"content": "more"}, "stop"))
    assert [e.type for e in evs[-2:]] == ["response.failed", "error"]
    assert evs[-2].response.error.code == "server_error"
    assert evs[-1].code == "upstream_model_mismatch"
    assert not any(getattr(e, "delta", None) == "more" for e in evs)


def test_a_cut_stream_fails():
    evs = events(chunk({"content": "a"}))
    assert evs[-2].type == "response.failed" and evs[-1].type == "error"


# -- the addons -------------------------------------------------------------------------------


def responses_flow(body: dict):
    req = tutils.treq(method=b"POST", path=b"/v1/responses", content=json.dumps(body).encode())
    return tflow.tflow(req=req)


def test_responses_in_rewrites_the_request_into_a_chat_completion():
    flow = responses_flow({"model": M, "input": "hi"})
    ResponsesIn(LimitSettings()).request(flow)
    assert flow.response is None and flow.request.path == "/v1/chat/completions"
    assert json.loads(flow.request.content) == {
        "model": M,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert flowstate.responses_call(flow) is not None


def test_responses_in_refuses_what_it_cannot_translate():
    flow = responses_flow({"model": M, "input": "hi", "previous_response_id": "resp_1"})
    ResponsesIn(LimitSettings()).request(flow)
    assert flow.response.status_code == 400
    assert flowstate.route(flow) == Route.LOCAL and flowstate.responses_call(flow) is None


def test_responses_out_translates_a_plain_answer_and_fails_closed_on_garbage():
    for content, status in [
        (json.dumps(completion({"content": "hi"})).encode(), 200),
        (b"[1]", 502),
    ]:
        flow = responses_flow({"model": M, "input": "hi"})
        ResponsesIn(LimitSettings()).request(flow)
        flowstate.set_chat_request(
            flow,
            parse_chat_request(
                flow.request.content, max_tokens=5, temperature=1.0, top_p=1.0, max_depth=64
            ),
        )
        flowstate.passed(flow, Stage.UPSTREAM)
        flow.response = tutils.tresp(content=content)
        ResponsesOut().response(flow)
        assert flow.response.status_code == status
        if status == 200:
            assert Response.model_validate(flow.response.json()).output_text == "hi"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        (b"POST", b"/v1/responses", 500, "internal_error"),  # untranslated: fail closed
        (b"GET", b"/v1/responses", 405, "method_not_allowed"),
        (b"POST", b"/v1/responses?stream=true", 400, "unsupported_parameter"),
        (b"GET", b"/v1/responses/resp_1", 404, "response_not_stored"),
        (b"POST", b"/v1/responses/resp_1/cancel", 404, "response_not_stored"),
        (b"POST", b"/v1/responses/input_tokens", 404, "not_found"),
    ],
)
def test_the_router_answers_responses_paths_it_does_not_serve(method, path, status, code):
    flow = tflow.tflow(req=tutils.treq(method=method, path=path, content=b"{}"))
    if (method, path) != (b"POST", b"/v1/responses"):
        ResponsesIn(LimitSettings()).request(flow)  # leaves every other request to the Router
        assert flow.response is None
    with taddons.context():
        Router(CatalogSync(Settings().catalog, Settings().upstream)).request(flow)
    assert flow.response.status_code == status
    assert flow.response.json()["error"]["code"] == code


def test_a_replayed_history_as_frameworks_send_it():
    """Output items sent back as input, with their ids, statuses, annotations and an
    encrypted reasoning item (pydantic-ai, LangChain and the Vercel AI SDK with store off)."""
    body = chat(
        {
            "input": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "q"},
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [{"type": "summary_text", "text": "plan"}],
                    "encrypted_content": "opaque",
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [
                        {"type": "output_text", "text": "a", "annotations": [], "logprobs": []}
                    ],
                },
                {
                    "type": "function_call",
                    "id": "fc_1",
                    "call_id": "c1",
                    "name": "f",
                    "arguments": "{}",
                    "status": "completed",
                },
                {"type": "function_call_output", "call_id": "c1", "output": "r", "id": "fco"},
            ],
        }
    )
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "a",
            "reasoning_content": "plan",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]


@pytest.mark.parametrize(
    ("chat_param", "expected"),
    [
        ("messages", "input"),
        ("messages[3].content", "input"),
        ("max_completion_tokens", "max_output_tokens"),
        ("response_format", "text.format"),
        ("reasoning_effort", "reasoning.effort"),
        ("tools[1].function.parameters", "tools[1].parameters"),
        ("model", "model"),
        ("temperature", "temperature"),
    ],
)
def test_refusals_by_later_stages_name_the_responses_parameter(chat_param, expected):
    assert responses_param(chat_param) == expected
    flow = responses_flow({"model": M, "input": "hi"})
    ResponsesIn(LimitSettings()).request(flow)
    flow.response = GatewayError(400, "no", "unsupported_parameter", param=chat_param).response()
    ResponsesOut().response(flow)
    assert flow.response.json()["error"]["param"] == expected
