"""The openai Python SDK's cells: chat completions and the Responses API, as its docs show them."""

from __future__ import annotations

import json
from typing import Any

from tests.compat.py_cells import WEATHER_SCHEMA, City, Outcome, Target, cell

# -- openai (Python) --------------------------------------------------------------------------


def _openai(t: Target):
    import openai

    return openai.OpenAI(base_url=t.api_base, api_key=t.api_key, max_retries=0, timeout=30)


@cell("openai_py", "chat")
def openai_chat(t: Target) -> Outcome:
    with _openai(t) as client:
        r = client.chat.completions.create(
            model=t.model, messages=[{"role": "user", "content": t.prompt}]
        )
    return Outcome(text=r.choices[0].message.content or "")


@cell("openai_py", "stream")
def openai_stream(t: Target) -> Outcome:
    out = Outcome()
    with _openai(t) as client:
        stream = client.chat.completions.create(
            model=t.model, messages=[{"role": "user", "content": t.prompt}], stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                out.text += chunk.choices[0].delta.content
                out.chunks += 1
    return out


@cell("openai_py", "tools")
def openai_tools(t: Target) -> Outcome:
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA},
        }
    ]
    messages: list[dict[str, Any]] = [{"role": "user", "content": t.tool_prompt}]
    out = Outcome()
    with _openai(t) as client:
        for _ in range(5):
            r = client.chat.completions.create(model=t.model, messages=messages, tools=tools)
            message = r.choices[0].message
            if not message.tool_calls:
                out.text = message.content or ""
                return out
            messages.append(message.model_dump(exclude_none=True))
            for call in message.tool_calls:
                json.loads(call.function.arguments)
                out.tool_calls += 1
                messages.append(
                    {"role": "tool", "tool_call_id": call.id, "content": t.tool_result}
                )
    raise AssertionError("the loop did not end in a text answer")


@cell("openai_py", "structured")
def openai_structured(t: Target) -> Outcome:
    with _openai(t) as client:
        r = client.chat.completions.parse(
            model=t.model,
            messages=[{"role": "user", "content": t.schema_prompt}],
            response_format=City,
        )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City), parsed
    return Outcome(data=parsed.model_dump())


@cell("openai_py", "responses")
def openai_responses(t: Target) -> Outcome:
    with _openai(t) as client:
        r = client.responses.create(model=t.model, input=t.prompt)
    return Outcome(text=r.output_text)


@cell("openai_py", "responses_stream")
def openai_responses_stream(t: Target) -> Outcome:
    out = Outcome()
    with _openai(t) as client:
        with client.responses.stream(model=t.model, input=t.prompt) as stream:
            for event in stream:
                if event.type == "response.output_text.delta":
                    out.chunks += 1
                    out.text += event.delta
            final = stream.get_final_response()
    assert final.output_text == out.text, (final.output_text, out.text)
    return out


@cell("openai_py", "responses_tools")
def openai_responses_tools(t: Target) -> Outcome:
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}]
    items: list[Any] = [{"role": "user", "content": t.tool_prompt}]
    out = Outcome()
    with _openai(t) as client:
        for _ in range(5):
            r = client.responses.create(model=t.model, input=items, tools=tools)
            calls = [item for item in r.output if item.type == "function_call"]
            if not calls:
                out.text = r.output_text
                return out
            items += [item.model_dump(exclude_none=True) for item in r.output]
            for call in calls:
                json.loads(call.arguments)
                out.tool_calls += 1
                items.append(
                    {
                        "type": "function_call_output",
                        "call_id": call.call_id,
                        "output": t.tool_result,
                    }
                )
    raise AssertionError("the loop did not end in a text answer")


@cell("openai_py", "responses_structured")
def openai_responses_structured(t: Target) -> Outcome:
    with _openai(t) as client:
        r = client.responses.parse(model=t.model, input=t.schema_prompt, text_format=City)
    assert isinstance(r.output_parsed, City), r.output_parsed
    return Outcome(data=r.output_parsed.model_dump())
