"""A sandbox upstream and a gateway verifying its evidence (dcap, the sandbox's test root),
as real processes, shared per module; helpers to flip a model's evidence and wait for the
gateway to notice (polling with a deadline: re-attestation runs in another process)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc, start_sandbox

TEST_MODELS = Path(__file__).resolve().parents[1] / "data" / "models.json"
MSG = [{"role": "user", "content": "hi"}]
# Re-attest every second, and retry failures as often, so a flip shows within seconds.
FAST = (
    "catalog.refresh_interval_s = 1\n"
    "attestation.reattest_interval_s = 1\n"
    "attestation.retry_interval_s = 1\n"
)


def until[T](predicate: Callable[[], T], what: str, timeout: float = 15.0) -> T:
    """Poll another process's state until ``predicate`` is truthy, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def upstream() -> Iterator[SandboxProc]:
    with start_sandbox("--models", str(TEST_MODELS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    with start_gateway(upstream.base_url, extra_toml=FAST) as gw:
        yield gw


@pytest.fixture
def http(gateway: GatewayProc) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {gateway.api_key}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=30) as c:
        yield c


@pytest.fixture
def client(gateway: GatewayProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway.api_base, api_key=gateway.api_key, max_retries=0, timeout=30
    ) as c:
        yield c


@pytest.fixture
def evidence(upstream: SandboxProc) -> Iterator[Callable[[str, str], dict[str, Any]]]:
    """``evidence(model, mode)`` switches what the sandbox attests for ``model``; every model
    switched is made valid again afterwards."""
    touched: set[str] = set()

    def switch(model: str, mode: str) -> dict[str, Any]:
        touched.add(model)
        resp = httpx.post(f"{upstream.base_url}/_sandbox/evidence", json={model: mode}, timeout=10)
        resp.raise_for_status()
        return resp.json()

    yield switch
    if touched:
        httpx.post(
            f"{upstream.base_url}/_sandbox/evidence",
            json=dict.fromkeys(touched, "valid"),
            timeout=10,
        ).raise_for_status()


def refusal(client: openai.OpenAI, model: str) -> dict[str, Any] | None:
    """The error body if a chat completion for ``model`` is refused, None when served."""
    try:
        client.chat.completions.create(model=model, messages=MSG)
    except openai.APIStatusError as e:
        return {"status": e.status_code, **(e.body if isinstance(e.body, dict) else {})}
    return None


def chat_count(upstream: SandboxProc) -> int:
    return upstream.stats()["by_route"].get("POST /v1/chat/completions", 0)


def root_ca(upstream: SandboxProc) -> httpx.Response:
    """The sandbox's test root (DER) with its MRTD and compose hash in the headers."""
    resp = httpx.get(f"{upstream.base_url}/_sandbox/evidence/root_ca.der", timeout=10)
    resp.raise_for_status()
    return resp
