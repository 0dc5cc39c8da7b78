"""A Chutes-flavoured sandbox (``--upstream chutes``) and a gateway with ``upstream.kind =
"chutes"`` (E2EE on, dcap against the sandbox's test root), as real processes per module."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc, start_sandbox

TEST_MODELS = Path(__file__).resolve().parents[1] / "data" / "models.json"
TEE = "deepseek-ai/DeepSeek-V3.2-TEE"
CHUTES = 'upstream.kind = "chutes"\n'
FAST = "attestation.reattest_interval_s = 2\nattestation.retry_interval_s = 1\n"


def until[T](predicate: Callable[[], T], what: str, timeout: float = 20.0) -> T:
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
    with start_sandbox("--upstream", "chutes", "--models", str(TEST_MODELS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    with start_gateway(upstream.base_url, extra_toml=CHUTES + FAST) as gw:
        yield gw


@pytest.fixture
def client(gateway: GatewayProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway.api_base, api_key=gateway.api_key, max_retries=0, timeout=30
    ) as c:
        yield c


@pytest.fixture
def http(gateway: GatewayProc) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {gateway.api_key}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=30) as c:
        yield c


@pytest.fixture
def sandbox(upstream: SandboxProc) -> Iterator[SandboxProc]:
    """The sandbox, its behaviour restored after the test. Not reset: a reset forgets the
    nonce tokens the gateway's pool holds, which the front door would then refuse."""
    before = upstream.behaviour()
    yield upstream
    upstream.behaviour(**before)


def front_door(upstream: SandboxProc, since: int = 0) -> dict:
    """What the sandbox's front door relayed (entries after the ``since``-th), and whether any
    of it was ever readable."""
    resp = httpx.get(f"{upstream.base_url}/_sandbox/chutes", timeout=10)
    resp.raise_for_status()
    doc = resp.json()
    doc["front_door"] = [e for e in doc["front_door"] if e["seq"] > since]
    return doc


def door_mark(upstream: SandboxProc) -> int:
    """The front door's last entry number now (a ``since`` for :func:`front_door`)."""
    return max((e["seq"] for e in front_door(upstream)["front_door"]), default=0)


def mark(upstream: SandboxProc, marker: str) -> None:
    """Have the front door flag any relayed body containing ``marker``."""
    httpx.post(
        f"{upstream.base_url}/_sandbox/chutes/marker", json={"marker": marker}, timeout=10
    ).raise_for_status()
