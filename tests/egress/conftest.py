"""Egress mode with real processes on loopback.

One gateway per module, with both listeners, in front of a TLS sandbox upstream
(127.0.0.1). Other sandboxes stand in for the rest of the internet:

* 127.0.0.3 is on the gateway's LLM host list (any port): a non-confidential provider,
  one over TLS and one over plain HTTP;
* 127.0.0.5 is listed and in ``audit``;
* 127.0.0.4 is not listed: an ordinary site, tunnelled (TLS) or passed through (HTTP).

All TLS sandboxes share one test CA (``ca.pem``) the gateway trusts for its upstream
connections; the gateway's own CA is a different one, made on its first start.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.egress import (
    AUDITED,
    LISTED,
    UNLISTED,
    gateway_ca_path,
    start_tls_sandbox,
)
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc, start_sandbox
from tests.support.testdata import TEST_MODELS


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sandbox-tls")


@pytest.fixture(scope="module")
def upstream(tls_dir: Path) -> Iterator[SandboxProc]:
    with start_tls_sandbox(tls_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def listed_tls(tls_dir: Path) -> Iterator[SandboxProc]:
    with start_tls_sandbox(tls_dir, LISTED) as proc:
        yield proc


@pytest.fixture(scope="module")
def listed_plain() -> Iterator[SandboxProc]:
    with start_sandbox("--host", LISTED, "--models", str(TEST_MODELS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def audited(tls_dir: Path) -> Iterator[SandboxProc]:
    with start_tls_sandbox(tls_dir, AUDITED) as proc:
        yield proc


@pytest.fixture(scope="module")
def unlisted_tls(tls_dir: Path) -> Iterator[SandboxProc]:
    with start_tls_sandbox(tls_dir, UNLISTED) as proc:
        yield proc


@pytest.fixture(scope="module")
def unlisted_plain() -> Iterator[SandboxProc]:
    with start_sandbox("--host", UNLISTED, "--models", str(TEST_MODELS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc, tls_dir: Path) -> Iterator[GatewayProc]:
    extra = (
        f'upstream.ca_file = "{tls_dir / "ca.pem"}"\n'
        "catalog.refresh_interval_s = 1\n"
        f'egress.extra_llm_hosts = ["{LISTED}", "{AUDITED}"]\n'
        f'egress.audit_hosts = ["{AUDITED}"]\n'
    )
    with start_gateway(upstream.base_url, extra_toml=extra) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _fresh_sandboxes(request: pytest.FixtureRequest) -> None:
    for name in (
        "upstream",
        "listed_tls",
        "listed_plain",
        "audited",
        "unlisted_tls",
        "unlisted_plain",
    ):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


@pytest.fixture(scope="module")
def gateway_ca(gateway: GatewayProc) -> Path:
    """The CA path as ``teegate ca path`` reports it for the gateway's own proxy.toml."""
    return gateway_ca_path(gateway)


@pytest.fixture
def egress_http(gateway: GatewayProc, gateway_ca: Path) -> Iterator[httpx.Client]:
    """What an app gets with HTTPS_PROXY set and the gateway CA trusted."""
    verify = ssl.create_default_context(cafile=str(gateway_ca))
    with httpx.Client(proxy=gateway.urls["egress"], verify=verify, timeout=30) as c:
        yield c


@pytest.fixture
def egress_openai(gateway: GatewayProc, gateway_ca: Path) -> Callable[..., openai.OpenAI]:
    """The openai SDK as an app behind the proxy builds it (each client owns its httpx client)."""

    def make(base_url: str, api_key: str | None = None) -> openai.OpenAI:
        """``api_key`` defaults to the gateway key of the funded test account."""
        verify = ssl.create_default_context(cafile=str(gateway_ca))
        http_client = httpx.Client(proxy=gateway.urls["egress"], verify=verify, timeout=30)
        return openai.OpenAI(
            base_url=base_url,
            api_key=api_key or gateway.api_key,
            http_client=http_client,
            max_retries=0,
        )

    return make
