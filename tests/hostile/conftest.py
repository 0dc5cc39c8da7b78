"""A hostile client against a real gateway and a recording upstream (real processes, per module).

The sandbox upstream records every request it receives (``SandboxProc.requests()``), so what
the gateway let through is checked where it arrived, not where the gateway says it sent it.
Nothing is reset between the tests of a module: the last test of a module re-checks the whole
record, and the gateway's whole output, after every attack.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc, start_sandbox
from tests.support.testdata import TEE, TEST_MODELS

READY_TIMEOUT_S = 30.0

# Generous enough that no attack is refused for rate or money rather than for what it is.
GATEWAY_TOML = "ratelimit.requests_per_minute = 1000000\n"


@pytest.fixture(scope="module")
def upstream() -> Iterator[SandboxProc]:
    with start_sandbox("--models", str(TEST_MODELS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    with start_gateway(upstream.base_url, extra_toml=GATEWAY_TOML, balance_usd="100000") as gw:
        wait_until_serving(gw)
        yield gw


def wait_until_serving(gw: GatewayProc) -> None:
    """Until a plain chat completion goes through (the first attestation verdict is in)."""
    body = {"model": TEE, "messages": [{"role": "user", "content": "warm-up"}], "max_tokens": 5}
    headers = {"authorization": f"Bearer {gw.api_key}"}
    deadline = time.monotonic() + READY_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        status = httpx.post(
            f"{gw.api_base}/chat/completions", json=body, headers=headers, timeout=10
        ).status_code
        if status == 200:
            return
        time.sleep(0.2)  # polling an observable condition, with a bound
    raise AssertionError(f"the gateway did not serve a chat completion in time (last {status})")


@pytest.fixture(scope="module")
def http(gateway: GatewayProc) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {gateway.api_key}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=30) as c:
        yield c
