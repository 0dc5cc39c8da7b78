"""``teegate doctor`` as a real process against the module's running gateway and sandbox.

Set up as the documentation says (proxy variables to the egress listener, its CA in every
store, a gateway key), ``--client`` passes every check that applies; with the upstream gone,
it exits non-zero and prints the fix.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import certifi
import pytest

from tests.support.gateway_proc import REPO_ROOT, GatewayProc


def _doctor_toml(gateway: GatewayProc, name: str, upstream: str | None = None) -> Path:
    """The gateway's proxy.toml as deployed: the ports it bound, not "0" (beside the original,
    so its relative paths still hold)."""
    text = gateway.config_path.read_text()
    for kind, url in gateway.urls.items():
        text = re.sub(rf'^listen\.{kind} = ".*"$', f'listen.{kind} = "{url[7:]}"', text, flags=re.M)
    if upstream is not None:
        text = re.sub(
            r'^upstream\.base_url = ".*"$', f'upstream.base_url = "{upstream}"', text, flags=re.M
        )
    path = gateway.workdir / name
    path.write_text(text)
    return path


def _doctor(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "teegate", "doctor", "-c", str(config), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def client_env(gateway: GatewayProc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A shell set up as docs/egress.md and the sandbox banner say."""
    ca = next((gateway.workdir / "ca").glob("*-ca-cert.pem"))
    bundle = tmp_path_factory.mktemp("doctor") / "teegate-bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + ca.read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    egress = gateway.urls["egress"]
    env.update(
        HTTPS_PROXY=egress,
        HTTP_PROXY=egress,
        SSL_CERT_FILE=str(bundle),
        REQUESTS_CA_BUNDLE=str(bundle),
        CURL_CA_BUNDLE=str(bundle),
        NODE_EXTRA_CA_CERTS=str(ca),
        TEEGATE_API_KEY=gateway.api_key or "",
    )
    return env


def test_a_working_setup_passes(gateway, client_env):
    out = _doctor(_doctor_toml(gateway, "doctor.toml"), client_env, "--client", "--json")
    report = json.loads(out.stdout)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert out.returncode == 0 and report["ok"] and failed == [], out.stdout
    status = {c["name"]: c["status"] for c in report["checks"]}
    for name in (
        "configuration loads",
        "upstream reachable, catalog fresh",
        "reverse listener bound",
        "egress listener bound",
        "per-model verdicts",
        "egress CA exists",
        "egress listener uses this CA",
        "proxy variables reach the egress listener",
        "NO_PROXY does not bypass the gateway",
        "python trusts the egress CA",
    ):
        assert status[name] == "ok", (name, out.stdout)


def test_the_upstream_down_fails_with_a_fix(gateway, client_env):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    config = _doctor_toml(gateway, "doctor-down.toml", f"http://127.0.0.1:{closed}")
    out = _doctor(config, client_env)
    assert out.returncode == 1, out.stdout
    line = re.search(
        r"^\[FAIL\] upstream reachable, catalog fresh: (.*)\n\s+fix: (.*)$", out.stdout, re.M
    )
    assert line, out.stdout
    assert "unreachable" in line.group(1) and "upstream.base_url" in line.group(2)
