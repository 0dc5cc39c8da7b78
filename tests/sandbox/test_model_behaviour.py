"""The sandbox behaves like a model, as seen by the openai SDK: a tool loop ends in text, ``n``,
``logprobs``, ``seed``, ``stop``, ``max_tokens``, structured outputs parsed into a pydantic
model, and reasoning streamed before content. Plus a table of schemas whose generated
instances must validate (jsonschema is not installed here, so a small checker does it)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from teegate.sandbox.schema_values import value_for_schema
from tests.support.sandbox_proc import SandboxProc

MODEL = "zai-org/GLM-5.1-TEE"  # lists "reasoning"
PLAIN_MODEL = "XiaomiMiMo/MiMo-V2-Flash-TEE"  # does not
WEATHER = {
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


@pytest.fixture
def client(sandbox: SandboxProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sandbox.api_base, api_key=sandbox.api_key, max_retries=0) as c:
        yield c


def test_tool_loop_ends_in_text_that_uses_the_result(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "sandbox"}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    assert "sunny, 21C" in second.choices[0].message.content
    none = client.chat.completions.create(
        model=MODEL, messages=messages[:1], tools=[WEATHER], tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None


def test_n_choices_are_distinct_and_all_counted(client: openai.OpenAI) -> None:
    user = [{"role": "user", "content": "hi"}]
    one = client.chat.completions.create(model=MODEL, messages=user)
    three = client.chat.completions.create(model=MODEL, messages=user, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.message.content for c in three.choices}) == 3
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    stream = client.chat.completions.create(
        model=MODEL, messages=user, n=3, stream=True, stream_options={"include_usage": True}
    )
    texts = {0: "", 1: "", 2: ""}
    finishes = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        usage = chunk.usage or None
    assert texts == {c.index: c.message.content for c in three.choices}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert usage is not None and usage.completion_tokens == three.usage.completion_tokens


def test_logprobs_shape_plain_and_streamed(client: openai.OpenAI) -> None:
    user = [{"role": "user", "content": "hi"}]
    answer = client.chat.completions.create(
        model=MODEL, messages=user, logprobs=True, top_logprobs=2
    )
    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    assert len(content) == answer.usage.completion_tokens
    for token in content:
        assert token.logprob < 0 and bytes(token.bytes).decode() == token.token
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].token == token.token
    streamed = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=user, logprobs=True, top_logprobs=2, stream=True
    ):
        for c in chunk.choices:
            if c.delta.content:
                streamed += c.logprobs.content
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=user)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=user, top_logprobs=2)


def test_seed_is_deterministic(client: openai.OpenAI) -> None:
    user = [{"role": "user", "content": "hi"}]

    def text(seed: int) -> str:
        answer = client.chat.completions.create(model=MODEL, messages=user, seed=seed)
        return answer.choices[0].message.content or ""

    assert text(7) == text(7)
    assert text(7) != text(8)


def test_stop_and_length(client: openai.OpenAI) -> None:
    user = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model=MODEL, messages=user).choices[0].message.content
    assert full is not None and " #2" in full
    cut = client.chat.completions.create(model=MODEL, messages=user, stop=["#2", "never"])
    assert cut.choices[0].message.content == full[: full.index("#2")]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == 3  # "Sandbox reply from ...", " #1", " "
    short = client.chat.completions.create(model=MODEL, messages=user, max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 2
    assert full.startswith(short.choices[0].message.content or "-")


class City(BaseModel):
    name: str = Field(min_length=10)
    kind: Literal["capital", "town"]
    population: int = Field(ge=1000)
    tags: list[str] = Field(min_length=2)


class Trip(BaseModel):
    origin: City
    stops: list[City]
    score: float = Field(gt=0, le=5)


def test_structured_output_parses_into_the_model(client: openai.OpenAI) -> None:
    parsed = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "plan"}], response_format=Trip
    )
    trip = parsed.choices[0].message.parsed
    assert isinstance(trip, Trip) and trip.origin.kind == "capital"
    assert len(trip.origin.tags) == 2 and trip.origin.population >= 1000
    as_json = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "json"}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(as_json.choices[0].message.content or ""), dict)


def test_reasoning_streams_before_content(client: openai.OpenAI) -> None:
    user = [{"role": "user", "content": "think"}]
    order = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=user, reasoning_effort="low", stream=True
    ):
        for c in chunk.choices:
            delta = c.delta.model_dump()
            if delta.get("reasoning_content"):
                order.append("reasoning")
            if delta.get("content"):
                order.append("content")
    assert order[0] == "reasoning" and "content" in order
    assert order == sorted(order, key=lambda k: k == "content")  # all reasoning first
    plain = client.chat.completions.create(model=MODEL, messages=user, reasoning_effort="low")
    message = plain.choices[0].message.model_dump()
    assert message["reasoning_content"]
    assert plain.usage.completion_tokens_details.reasoning_tokens == 3
    other = client.chat.completions.create(model=PLAIN_MODEL, messages=user, reasoning_effort="low")
    assert "reasoning_content" not in other.choices[0].message.model_dump()


FORMATS = {
    "date-time": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
    "date": r"\d{4}-\d\d-\d\d",
    "email": r"[^@]+@[^@]+",
    "uri": r"https?://.+",
    "uuid": r"[0-9a-f-]{36}",
}


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    """A small validator for the keywords the generator claims to cover."""
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"][2:].split("/"):
            node = node[part]
        return _check(value, node, root)
    if "const" in schema:
        assert value == schema["const"]
    if "enum" in schema:
        assert value in schema["enum"]
    if "anyOf" in schema:
        errors = 0
        for branch in schema["anyOf"]:
            try:
                _check(value, branch, root)
            except AssertionError:
                errors += 1
        assert errors < len(schema["anyOf"])
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    py = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
        "null": type(None),
    }
    if kinds:
        assert any(isinstance(value, py[k]) for k in kinds), (value, kinds)
    if isinstance(value, dict):
        assert set(schema.get("required", [])) <= set(value)
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                _check(value[name], sub, root)
    if isinstance(value, list):
        assert len(value) >= schema.get("minItems", 0)
        for item in value:
            _check(item, schema.get("items", {}), root)
    if isinstance(value, str):
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9)
        if schema.get("format") in FORMATS:
            assert re.fullmatch(FORMATS[schema["format"]], value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        assert value >= schema.get("minimum", value) and value <= schema.get("maximum", value)
        assert value > schema.get("exclusiveMinimum", value - 1)
        assert value < schema.get("exclusiveMaximum", value + 1)
        if "multipleOf" in schema:
            assert value % schema["multipleOf"] == 0
    return None


SCHEMAS = [
    {"type": "object", "properties": {"a": {"const": 3}}, "required": ["a"]},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 3},
    {"type": "string", "format": "date-time"},
    {"type": "string", "format": "email"},
    {"type": "string", "format": "uuid"},
    {"type": "string", "minLength": 12, "maxLength": 14},
    {"type": "string", "maxLength": 3},
    {"type": "integer", "minimum": 5, "maximum": 9},
    {"type": "integer", "exclusiveMinimum": 5, "multipleOf": 4},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"type": "number", "maximum": -10},
    {"anyOf": [{"type": "integer", "minimum": 2}, {"type": "null"}]},
    {"type": ["null", "boolean"]},
    {
        "type": "object",
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {"at": {"type": "string", "format": "date"}},
                "required": ["at"],
            }
        },
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 2}
        },
        "required": ["items"],
    },
    Trip.model_json_schema(),
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_generated_instances_validate(schema: dict[str, Any]) -> None:
    _check(value_for_schema(schema), schema, schema)


def test_the_checker_can_fail() -> None:
    with pytest.raises(AssertionError):
        _check({"items": [{}]}, SCHEMAS[13], SCHEMAS[13])
