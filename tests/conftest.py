"""Fixtures shared across test folders: a sandbox upstream and a gateway in front of it, as
real processes, one of each per test module, and the clients tests hold on them.

Folders that need other processes (egress, attestation_e2e, hostile, sandbox) define
fixtures of the same names in their own conftest, which take precedence there. A folder
whose tests want a sandbox reset before each one opts in with an autouse fixture that
requests ``fresh_upstream``; the hostile tests, which re-check a module's whole record,
do not.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.clients import sdk
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.postgres import Cluster, cluster_or_fail
from tests.support.sandbox_proc import SandboxProc, start_sandbox
from tests.support.testdata import TEST_MODELS


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster, started on first use (never skipped: fails if it cannot)."""
    with cluster_or_fail() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def upstream() -> Iterator[SandboxProc]:
    with start_sandbox("--models", str(TEST_MODELS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    with start_gateway(upstream.base_url, extra_toml="catalog.refresh_interval_s = 1") as gw:
        yield gw


@pytest.fixture
def fresh_upstream(request: pytest.FixtureRequest) -> None:
    """Reset the module's sandbox before the test, if the test uses one."""
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").reset()


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
