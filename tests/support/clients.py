"""What tests hold on the running processes: the openai SDK against the gateway, and the
number of chat completions the sandbox upstream received."""

from __future__ import annotations

import openai

from tests.support.gateway_proc import GatewayProc
from tests.support.sandbox_proc import SandboxProc


def sdk(gateway: GatewayProc, api_key: str | None = None, **kw) -> openai.OpenAI:
    """The official client against the gateway, no retries (tests count requests)."""
    key = api_key or gateway.api_key
    return openai.OpenAI(base_url=gateway.api_base, api_key=key, max_retries=0, timeout=30, **kw)


def chat_count(upstream: SandboxProc) -> int:
    return upstream.stats()["by_route"].get("POST /v1/chat/completions", 0)
