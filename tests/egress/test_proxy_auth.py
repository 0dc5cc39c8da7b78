"""egress.proxy_auth = "api_key": the egress listener serves only holders of a gateway key."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.support.clients import chat_count
from tests.support.egress import LISTED
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE

MSG = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc, tls_dir: Path) -> Iterator[GatewayProc]:
    extra = (
        f'upstream.ca_file = "{tls_dir / "ca.pem"}"\n'
        f'egress.extra_llm_hosts = ["{LISTED}"]\n'
        'egress.proxy_auth = "api_key"\n'
    )
    with start_gateway(upstream.base_url, extra_toml=extra) as gw:
        yield gw


def _proxy(gw: GatewayProc, password: str | None) -> str:
    p = urlsplit(gw.urls["egress"])
    creds = f"app:{password}@" if password is not None else ""
    return f"http://{creds}{p.hostname}:{p.port}"


def _connect(gw: GatewayProc, target: str, auth: bytes = b"") -> bytes:
    p = urlsplit(gw.urls["egress"])
    with socket.create_connection((p.hostname, p.port), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode() + auth + b"\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return head


def test_connect_without_or_with_a_wrong_key_gets_407_and_nothing_is_connected(
    gateway, upstream, unlisted_plain
):
    for auth in (b"", b"Proxy-Authorization: Basic YXBwOnZncHVfc2tfbm9wZQ==\r\n"):
        for target in (f"127.0.0.1:{upstream.port}", f"127.0.0.4:{unlisted_plain.port}"):
            head = _connect(gateway, target, auth)
            assert head.startswith(b"HTTP/1.1 407"), head
            assert b'proxy-authenticate: basic realm="teegate egress"' in head.lower()
    assert unlisted_plain.stats()["total"] == 0
    assert chat_count(upstream) == 0


def test_a_plain_http_request_needs_the_key_too(gateway, unlisted_plain):
    url = f"{unlisted_plain.base_url}/v1/models"
    with httpx.Client(proxy=_proxy(gateway, None), timeout=10) as c:
        r = c.get(url)
    assert r.status_code == 407
    assert r.json()["error"]["code"] == "proxy_authentication_required"
    assert unlisted_plain.stats()["total"] == 0
    with httpx.Client(proxy=_proxy(gateway, gateway.api_key), timeout=10) as c:
        r = c.get(url, headers={"authorization": f"Bearer {unlisted_plain.api_key}"})
    assert r.status_code == 200  # tunnelled to an unlisted host, as without proxy auth
    assert gateway.api_key not in gateway.log_text()


def test_with_the_key_an_app_reaches_the_confidential_upstream(gateway, upstream):
    from tests.egress.test_ca import _ca_path  # the CA as `teegate ca path` reports it

    ca = Path(_ca_path(gateway.config_path).stdout.strip())
    http_client = httpx.Client(
        proxy=_proxy(gateway, gateway.api_key),
        verify=ssl.create_default_context(cafile=str(ca)),
        timeout=30,
    )
    with openai.OpenAI(
        base_url=upstream.api_base,
        api_key=gateway.api_key,
        http_client=http_client,
        max_retries=0,
    ) as client:
        reply = client.chat.completions.create(model=TEE, messages=MSG)
    assert reply.choices[0].message.content
    assert chat_count(upstream) == 1
    assert gateway.api_key not in gateway.log_text()
