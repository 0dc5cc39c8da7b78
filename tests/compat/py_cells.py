"""The Python clients' cells: one function per (client, feature), as a user of that client
would write it.

Each takes a :class:`Target` and returns an :class:`Outcome`; a failure raises (the runner
records the error). Nothing here configures a proxy or a CA: in egress mode the runner's
process has ``HTTPS_PROXY`` and the CA variables set, as a real app's environment would, and
each client finds them its own way. Heavy imports stay inside the functions, so a run imports
each framework once, and only if one of its cells runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel

CELLS: dict[tuple[str, str], Callable[[Target], Outcome]] = {}


@dataclass(frozen=True)
class Target:
    api_base: str  # ".../v1": the gateway's (reverse) or the upstream's own https URL (egress)
    api_key: str
    model: str
    marker: str  # unique per cell, in every prompt: how the tests find its upstream requests

    @property
    def prompt(self) -> str:
        return f"Say hello. [{self.marker}]"

    @property
    def tool_prompt(self) -> str:
        return f"What is the weather in Paris? Use the tool. [{self.marker}]"

    @property
    def tool_result(self) -> str:
        """What the tool returns: the final answer must quote it."""
        return f"sunny-{self.marker.rsplit(' ', 1)[-1]}"

    @property
    def schema_prompt(self) -> str:
        return f"Describe a city. [{self.marker}]"


@dataclass
class Outcome:
    text: str = ""  # the final answer's text
    chunks: int = 0  # text deltas received (streams)
    data: dict[str, Any] | None = None  # the parsed structured output
    tool_calls: int = 0  # tool calls the loop executed
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class City(BaseModel):
    name: str
    population: int


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


def cell(client: str, feature: str) -> Callable[[Callable[[Target], Outcome]], Any]:
    def register(fn: Callable[[Target], Outcome]) -> Callable[[Target], Outcome]:
        CELLS[(client, feature)] = fn
        return fn

    return register


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


# -- requests -----------------------------------------------------------------------------------


def _post(t: Target, path: str, body: dict[str, Any], stream: bool = False):
    import requests

    r = requests.post(
        f"{t.api_base}{path}",
        json=body,
        headers={"Authorization": f"Bearer {t.api_key}"},
        stream=stream,
        timeout=30,
    )
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    return r


def _sse(lines: Any) -> Any:
    """The JSON events of a server-sent event stream (``data:`` lines), until ``[DONE]``."""
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode()
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


def _chat_stream_text(events: Any) -> Outcome:
    out = Outcome()
    for event in events:
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                out.text += piece
                out.chunks += 1
    return out


def _responses_stream_text(events: Any) -> Outcome:
    out = Outcome()
    done = None
    for event in events:
        if event.get("type") == "response.output_text.delta":
            out.text += event["delta"]
            out.chunks += 1
        elif event.get("type") in ("response.failed", "error"):
            raise RuntimeError(f"stream failed: {event}")
        elif event.get("type") == "response.completed":
            done = event
    assert done is not None, "no response.completed event"
    return out


def _responses_text(body: dict[str, Any]) -> str:
    return "".join(
        part.get("text", "")
        for item in body.get("output") or []
        if item.get("type") == "message"
        for part in item.get("content") or []
        if part.get("type") == "output_text"
    )


@cell("requests", "chat")
def requests_chat(t: Target) -> Outcome:
    body = {"model": t.model, "messages": [{"role": "user", "content": t.prompt}]}
    r = _post(t, "/chat/completions", body)
    return Outcome(text=r.json()["choices"][0]["message"]["content"])


@cell("requests", "stream")
def requests_stream(t: Target) -> Outcome:
    body = {"model": t.model, "messages": [{"role": "user", "content": t.prompt}], "stream": True}
    with _post(t, "/chat/completions", body, stream=True) as r:
        return _chat_stream_text(_sse(r.iter_lines()))


@cell("requests", "responses")
def requests_responses(t: Target) -> Outcome:
    r = _post(t, "/responses", {"model": t.model, "input": t.prompt})
    return Outcome(text=_responses_text(r.json()))


@cell("requests", "responses_stream")
def requests_responses_stream(t: Target) -> Outcome:
    body = {"model": t.model, "input": t.prompt, "stream": True}
    with _post(t, "/responses", body, stream=True) as r:
        return _responses_stream_text(_sse(r.iter_lines()))


# -- curl -----------------------------------------------------------------------------------------


def _curl(t: Target, path: str, body: dict[str, Any], stream: bool = False) -> str:
    """curl as a user types it; in egress mode it reads HTTPS_PROXY and CURL_CA_BUNDLE."""
    args = ["curl", "-sS", "--fail-with-body", "--max-time", "30"]
    if stream:
        args.append("-N")
    args += [
        f"{t.api_base}{path}",
        "-H",
        f"authorization: Bearer {t.api_key}",
        "-H",
        "content-type: application/json",
        "-d",
        json.dumps(body),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=40)
    if done.returncode != 0:
        detail = f"{done.stderr.strip()} {done.stdout[:300]}"
        raise RuntimeError(f"curl exit {done.returncode}: {detail}")
    return done.stdout


@cell("curl", "chat")
def curl_chat(t: Target) -> Outcome:
    body = {"model": t.model, "messages": [{"role": "user", "content": t.prompt}]}
    answer = json.loads(_curl(t, "/chat/completions", body))
    return Outcome(text=answer["choices"][0]["message"]["content"])


@cell("curl", "stream")
def curl_stream(t: Target) -> Outcome:
    body = {"model": t.model, "messages": [{"role": "user", "content": t.prompt}], "stream": True}
    return _chat_stream_text(_sse(_curl(t, "/chat/completions", body, True).splitlines()))


@cell("curl", "responses")
def curl_responses(t: Target) -> Outcome:
    out = _curl(t, "/responses", {"model": t.model, "input": t.prompt})
    return Outcome(text=_responses_text(json.loads(out)))


@cell("curl", "responses_stream")
def curl_responses_stream(t: Target) -> Outcome:
    body = {"model": t.model, "input": t.prompt, "stream": True}
    return _responses_stream_text(_sse(_curl(t, "/responses", body, True).splitlines()))


# -- pydantic-ai ----------------------------------------------------------------------------------


def _pai_chat_model(t: Target):
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(t.model, provider=OpenAIProvider(base_url=t.api_base, api_key=t.api_key))


def _pai_default(t: Target) -> str:
    """The default ``Agent("openai:…")``: base URL and key from OPENAI_BASE_URL/OPENAI_API_KEY
    (the runner's environment), the model class the ``openai:`` prefix picks (Responses)."""
    assert os.environ["OPENAI_BASE_URL"] == t.api_base
    return f"openai:{t.model}"


def _pai_run(agent: Any, prompt: str) -> Any:
    return agent.run_sync(prompt).output


def _pai_stream(agent: Any, prompt: str) -> Outcome:
    async def go() -> Outcome:
        out = Outcome()
        async with agent.run_stream(prompt) as result:
            async for delta in result.stream_text(delta=True, debounce_by=None):
                out.text += delta
                out.chunks += 1
        return out

    return asyncio.run(go())


def _pai_tool_agent(model: Any, t: Target, out: Outcome):
    from pydantic_ai import Agent

    agent = Agent(model)

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        out.tool_calls += 1
        return t.tool_result

    return agent


def _pai_structured(model: Any, t: Target) -> Outcome:
    from pydantic_ai import Agent

    result = _pai_run(Agent(model, output_type=City), t.schema_prompt)
    assert isinstance(result, City), result
    return Outcome(data=result.model_dump())


@cell("pydantic_ai", "chat")
def pai_chat(t: Target) -> Outcome:
    from pydantic_ai import Agent

    return Outcome(text=_pai_run(Agent(_pai_chat_model(t)), t.prompt))


@cell("pydantic_ai", "stream")
def pai_stream(t: Target) -> Outcome:
    from pydantic_ai import Agent

    return _pai_stream(Agent(_pai_chat_model(t)), t.prompt)


@cell("pydantic_ai", "tools")
def pai_tools(t: Target) -> Outcome:
    out = Outcome()
    out.text = _pai_run(_pai_tool_agent(_pai_chat_model(t), t, out), t.tool_prompt)
    return out


@cell("pydantic_ai", "structured")
def pai_structured(t: Target) -> Outcome:
    return _pai_structured(_pai_chat_model(t), t)


@cell("pydantic_ai", "responses")
def pai_responses(t: Target) -> Outcome:
    from pydantic_ai import Agent

    return Outcome(text=_pai_run(Agent(_pai_default(t)), t.prompt))


@cell("pydantic_ai", "responses_stream")
def pai_responses_stream(t: Target) -> Outcome:
    from pydantic_ai import Agent

    return _pai_stream(Agent(_pai_default(t)), t.prompt)


@cell("pydantic_ai", "responses_tools")
def pai_responses_tools(t: Target) -> Outcome:
    out = Outcome()
    out.text = _pai_run(_pai_tool_agent(_pai_default(t), t, out), t.tool_prompt)
    return out


@cell("pydantic_ai", "responses_structured")
def pai_responses_structured(t: Target) -> Outcome:
    return _pai_structured(_pai_default(t), t)


# -- LangChain ------------------------------------------------------------------------------------


def _lc(t: Target, responses: bool):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=t.model,
        base_url=t.api_base,
        api_key=t.api_key,
        max_retries=0,
        timeout=30,
        use_responses_api=responses,
    )


def _lc_text(message: Any) -> str:
    text = message.text
    return text() if callable(text) else text


def _lc_chat(t: Target, responses: bool) -> Outcome:
    return Outcome(text=_lc_text(_lc(t, responses).invoke(t.prompt)))


def _lc_stream(t: Target, responses: bool) -> Outcome:
    out = Outcome()
    for chunk in _lc(t, responses).stream(t.prompt):
        piece = _lc_text(chunk)
        if piece:
            out.text += piece
            out.chunks += 1
    return out


def _lc_tools(t: Target, responses: bool) -> Outcome:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    out = Outcome()

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        out.tool_calls += 1
        return t.tool_result

    llm = _lc(t, responses).bind_tools([get_weather])
    messages: list[Any] = [HumanMessage(t.tool_prompt)]
    for _ in range(5):
        ai = llm.invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            out.text = _lc_text(ai)
            return out
        for call in ai.tool_calls:
            messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    raise AssertionError("the loop did not end in a text answer")


def _lc_structured(t: Target, responses: bool) -> Outcome:
    result = _lc(t, responses).with_structured_output(City).invoke(t.schema_prompt)
    assert isinstance(result, City), result
    return Outcome(data=result.model_dump())


for _feature, _fn in (("chat", _lc_chat), ("stream", _lc_stream), ("tools", _lc_tools)):
    cell("langchain", _feature)(lambda t, fn=_fn: fn(t, False))
    cell("langchain", f"responses_{_feature}" if _feature != "chat" else "responses")(
        lambda t, fn=_fn: fn(t, True)
    )
cell("langchain", "structured")(lambda t: _lc_structured(t, False))
cell("langchain", "responses_structured")(lambda t: _lc_structured(t, True))
