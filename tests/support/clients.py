"""What tests hold on the running processes: the openai SDK against the gateway, one raw chat
request, and the number of chat completions the sandbox upstream received."""

from __future__ import annotations

import httpx
import openai

from tests.support.gateway_proc import GatewayProc
from tests.support.sandbox_proc import SandboxProc


def sdk(gateway: GatewayProc, api_key: str | None = None, **kw) -> openai.OpenAI:
    """The official client against the gateway, no retries (tests count requests)."""
    key = api_key or gateway.api_key
    return openai.OpenAI(base_url=gateway.api_base, api_key=key, max_retries=0, timeout=30, **kw)


def chat_count(upstream: SandboxProc) -> int:
    return upstream.stats()["by_route"].get("POST /v1/chat/completions", 0)


def post_chat(gateway: GatewayProc, key: str, body: dict) -> httpx.Response:
    """One chat completion as plain HTTP (status, headers and envelope as the client gets them)."""
    with httpx.Client(timeout=30) as c:
        return c.post(
            f"{gateway.api_base}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
        )
