"""A Chutes-flavoured sandbox (``--upstream chutes``) and a gateway with ``upstream.kind =
"chutes"`` (E2EE on, dcap against the sandbox's test root), as real processes per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.chutes import CHUTES, FAST
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc, start_sandbox
from tests.support.testdata import TEST_MODELS


@pytest.fixture(scope="module")
def upstream() -> Iterator[SandboxProc]:
    with start_sandbox("--upstream", "chutes", "--models", str(TEST_MODELS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    with start_gateway(upstream.base_url, extra_toml=CHUTES + FAST) as gw:
        yield gw


@pytest.fixture
def sandbox(upstream: SandboxProc) -> Iterator[SandboxProc]:
    """The sandbox, its behaviour restored after the test. Not reset: a reset forgets the
    nonce tokens the gateway's pool holds, which the front door would then refuse."""
    before = upstream.behaviour()
    yield upstream
    upstream.behaviour(**before)
