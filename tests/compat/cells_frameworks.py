"""The agent frameworks' cells: pydantic-ai and LangChain, each over chat completions and over
the Responses API (pydantic-ai's default ``openai:`` model, LangChain's ``use_responses_api``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from tests.compat.py_cells import City, Outcome, Target, cell

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
