"""A sandbox upstream and a gateway verifying its evidence (dcap, the sandbox's test root),
as real processes, shared per module, and a switch for what the sandbox attests (the
helpers that wait for the gateway to notice: tests/support/reattest.py).

The gateway requires GPU evidence (``attestation.gpu_evidence = "require"``): every sandbox
model sends it unless switched to ``no_gpu``, so this changes nothing else and lets the
``no_gpu`` case show a model without GPU evidence refused end to end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.reattest import FAST
from tests.support.sandbox_proc import SandboxProc, start_sandbox
from tests.support.testdata import TEST_MODELS

REQUIRE_GPU = 'attestation.gpu_evidence = "require"\n'


@pytest.fixture(scope="module")
def upstream() -> Iterator[SandboxProc]:
    with start_sandbox("--models", str(TEST_MODELS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    with start_gateway(upstream.base_url, extra_toml=FAST + REQUIRE_GPU) as gw:
        yield gw


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
