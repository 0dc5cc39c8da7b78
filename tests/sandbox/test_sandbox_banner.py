"""``teegate sandbox``'s banner teaches egress mode, and what it says works as written.

The banner is read from a real ``teegate sandbox`` process; its egress URL, CA path and
key are then used exactly as a developer would copy them: the CA verifies the listener's
certificate for a listed LLM host (refused, the hint naming the gateway's reverse URL from
the same banner), and the simulated upstream answers through the proxy.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from teegate.commands.sandbox import _egress_banner
from tests.support.sandbox_command import field, run_sandbox_command


@pytest.fixture(scope="module")
def banner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_sandbox_command(tmp_path_factory.mktemp("sandbox-banner")) as text:
        yield text


def test_the_banner_shows_how_to_try_egress(banner):
    egress = field(banner, r"TEEGATE READY egress (\S+)")
    assert "regular" not in banner
    assert f"export HTTPS_PROXY={egress}" in banner
    ca = Path(field(banner, r"CA to trust: (\S+)"))
    assert ca.is_file() and b"BEGIN CERTIFICATE" in ca.read_bytes()
    assert "teegate ca path" in banner
    assert "SSL_CERT_FILE=" in banner and "REQUESTS_CA_BUNDLE=" in banner
    assert "curl --cacert" in banner
    assert f"NODE_EXTRA_CA_CERTS={ca}" in banner
    assert "Node before 22 ignores HTTPS_PROXY without an agent" in banner


def test_the_banners_egress_instructions_work(banner):
    egress = field(banner, r"TEEGATE READY egress (\S+)")
    reverse = field(banner, r"TEEGATE READY reverse (\S+)")
    upstream = field(banner, r"simulated confidential upstream: (\S+)")
    key = field(banner, r"key (\S+)\n")
    ca = field(banner, r"CA to trust: (\S+)")
    trust = ssl.create_default_context(cafile=ca)  # the banner's CA alone verifies the listener
    with httpx.Client(proxy=egress, verify=trust, timeout=30, trust_env=False) as c:
        refused = c.get("https://api.openai.com/v1/models", headers={"authorization": "Bearer x"})
        listed = c.get(f"{upstream}/v1/models", headers={"authorization": f"Bearer {key}"})
    error = refused.json()["error"]
    assert refused.status_code == 403 and error["code"] == "provider_not_confidential"
    assert f"base_url={reverse}/v1 " in error["message"]
    assert listed.status_code == 200 and listed.json()["data"]


def test_without_a_ca_path_the_banner_names_the_command():
    text = _egress_banner("http://127.0.0.1:8081", None, "http://up:1", "k")
    assert "NODE_EXTRA_CA_CERTS=$(teegate ca path -c proxy.toml)" in text


def test_the_banners_dashboard_sign_in_works(banner):
    """The dashboard URL and the sandbox's own admin token, used as printed."""
    dashboard = field(banner, r"dashboard: (\S+)")
    token = field(banner, r"sign in with the admin token (\S+)")
    assert dashboard.endswith("/dashboard/") and token.startswith("tgadm_")
    with httpx.Client(timeout=30, trust_env=False) as c:
        assert "Admin token or API key" in c.get(dashboard).text  # the sign-in page
        signed_in = c.post(dashboard + "login", data={"token": token})
        assert signed_in.status_code == 303 and "teegate_dashboard" in c.cookies
        assert c.get(dashboard + "api/session").json()["role"] == "admin"
