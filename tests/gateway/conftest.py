"""A sandbox upstream and a gateway in front of it, as real processes, per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc, start_sandbox

DATA = Path(__file__).resolve().parents[1] / "data"
TEST_MODELS = DATA / "models.json"
TEE = "deepseek-ai/DeepSeek-V3.2-TEE"


@pytest.fixture(scope="module")
def upstream() -> Iterator[SandboxProc]:
    with start_sandbox("--models", str(TEST_MODELS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    with start_gateway(upstream.base_url, extra_toml="catalog.refresh_interval_s = 1") as gw:
        yield gw


@pytest.fixture(autouse=True)
def _fresh_upstream(request: pytest.FixtureRequest) -> None:
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").reset()


def sdk(gateway: GatewayProc, api_key: str | None = None, **kw) -> openai.OpenAI:
    """The official client against the gateway, no retries (tests count requests)."""
    key = api_key or gateway.api_key
    return openai.OpenAI(base_url=gateway.api_base, api_key=key, max_retries=0, timeout=30, **kw)


@pytest.fixture
def client(gateway: GatewayProc) -> Iterator[openai.OpenAI]:
    with sdk(gateway) as c:
        yield c


@pytest.fixture
async def aclient(gateway: GatewayProc):
    async with openai.AsyncOpenAI(
        base_url=gateway.api_base, api_key=gateway.api_key, max_retries=0, timeout=30
    ) as c:
        yield c


@pytest.fixture
def http(gateway: GatewayProc) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {gateway.api_key}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=30) as c:
        yield c


def chat_count(upstream: SandboxProc) -> int:
    return upstream.stats()["by_route"].get("POST /v1/chat/completions", 0)
