"""Interop: Chutes' published E2EE client (``chutes-e2ee`` 0.1.0, a test-only dependency) talks
to the sandbox's Chutes flavour through the unchanged openai SDK.

Why: the sandbox's server side and the gateway's client side are written apart, but a test of
one against the other cannot show that either speaks the real protocol. An independent client
that Chutes publishes completing a chat and a stream against the sandbox does.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest
from chutes_e2ee import AsyncChutesE2EETransport, ChutesE2EETransport
from openai import AsyncOpenAI, OpenAI

from tests.support.sandbox_proc import SandboxProc, start_sandbox

MODEL = "zai-org/GLM-5.1-TEE"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProc]:
    with start_sandbox("--upstream", "chutes", "--chunks", "5") as proc:
        yield proc


def _marker(sandbox: SandboxProc) -> str:
    marker = "INTEROP-" + secrets.token_hex(8)
    with httpx.Client(base_url=sandbox.base_url) as control:
        control.post("/_sandbox/chutes/marker", json={"marker": marker}).raise_for_status()
    return marker


@pytest.fixture
def openai_client(sandbox: SandboxProc) -> Iterator[OpenAI]:
    transport = ChutesE2EETransport(api_key=sandbox.api_key, api_base=sandbox.base_url)
    with httpx.Client(transport=transport) as http:
        yield OpenAI(api_key=sandbox.api_key, base_url=sandbox.api_base, http_client=http)


def test_published_client_chat(sandbox: SandboxProc, openai_client: OpenAI) -> None:
    marker = _marker(sandbox)
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"{marker} say hi"}]
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    stats = sandbox.stats()
    assert stats["by_route"].get("POST /e2e/invoke") == 1
    assert "POST /v1/chat/completions" not in stats["by_route"]
    assert stats["plaintext_seen"] is False
    assert stats["chat"][-1]["body"]["messages"][0]["content"].startswith(marker)


def test_published_client_stream(sandbox: SandboxProc, openai_client: OpenAI) -> None:
    _marker(sandbox)
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Sandbox reply")
    assert any(c.usage and c.usage.completion_tokens == 5 for c in chunks)
    assert sandbox.stats()["plaintext_seen"] is False


async def test_published_async_client_stream_with_tools(sandbox: SandboxProc) -> None:
    transport = AsyncChutesE2EETransport(api_key=sandbox.api_key, api_base=sandbox.base_url)
    async with httpx.AsyncClient(transport=transport) as http:
        client = AsyncOpenAI(api_key=sandbox.api_key, base_url=sandbox.api_base, http_client=http)
        tool = {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "use the tool"}],
            tools=[tool],
            tool_choice="required",
            stream=True,
        )
        names = [
            call.function.name
            async for chunk in stream
            if chunk.choices
            for call in chunk.choices[0].delta.tool_calls or []
            if call.function and call.function.name
        ]
    assert names == ["lookup"]
    assert sandbox.stats()["plaintext_seen"] is False
