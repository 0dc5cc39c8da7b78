"""``teegate sandbox --tls``: an unchanged app calling the simulated upstream's https URL
through the egress listener is intercepted, gated and billed, end to end.

One real ``teegate sandbox --tls`` process for the module; every URL, key and path comes from
its banner. The app trusts only the gateway's egress CA (never the sandbox's own test CA, which
only the gateway trusts), exactly as an app in a real deployment would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import certifi
import httpx
import openai
import pytest

from tests.support.billing import usage_row
from tests.support.sandbox_command import field, run_sandbox_command
from tests.support.testdata import NON_TEE, TEE

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def banner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("sandbox-tls")
    with run_sandbox_command(work, "--tls", "--chunk-delay-ms", "0") as text:
        yield text


@pytest.fixture(scope="module")
def app(banner: str) -> Iterator[openai.OpenAI]:
    """The openai SDK as the unchanged app builds it: the upstream's own https URL, the proxy
    and the gateway's egress CA (nothing else trusted), the gateway key."""
    upstream = field(banner, r"simulated confidential upstream: (\S+)")
    trust = ssl.create_default_context(cafile=field(banner, r"CA to trust: (\S+)"))
    proxy = field(banner, r"TEEGATE READY egress (\S+)")
    http_client = httpx.Client(proxy=proxy, verify=trust, timeout=30, trust_env=False)
    key = field(banner, r"key (\S+)\n")
    with openai.OpenAI(
        base_url=f"{upstream}/v1", api_key=key, http_client=http_client, max_retries=0
    ) as client:
        yield client


def test_the_upstream_is_https_under_its_own_ca(banner):
    upstream = field(banner, r"simulated confidential upstream: (\S+)")
    assert upstream.startswith("https://127.0.0.1:")
    sandbox_ca = Path(field(banner, r"its own test CA (\S+):"))
    assert sandbox_ca.is_file()
    assert sandbox_ca != Path(field(banner, r"CA to trust: (\S+)"))
    assert "curl --cacert teegate-bundle.pem -x " in banner
    assert "export CURL_CA_BUNDLE=$PWD/teegate-bundle.pem" in banner


def test_a_confidential_model_is_served_and_billed(app, banner):
    raw = app.chat.completions.with_raw_response.create(model=TEE, messages=HELLO)
    reply = raw.parse()
    assert reply.model == TEE and reply.choices[0].message.content
    assert raw.headers["x-teegate-attestation-mode"] == "dcap"  # intercepted, not tunnelled
    row = usage_row(Path(field(banner, r"ledger: (\S+)")), raw.headers["x-request-id"])
    assert row["state"] == "settled" and row["charge_micro"] > 0
    assert row["completion_tokens"] == reply.usage.completion_tokens


def test_a_model_without_tee_is_refused_before_it_leaves(app):
    with pytest.raises(openai.BadRequestError) as exc:
        app.chat.completions.create(model=NON_TEE, messages=HELLO)
    assert exc.value.status_code == 400
    assert exc.value.body["code"] == "model_not_confidential"


def _bundle(banner: str, folder: Path) -> Path:
    """``cat "$(python -m certifi)" CA > teegate-bundle.pem``, as the banner says."""
    bundle = folder / "teegate-bundle.pem"
    ca = Path(field(banner, r"CA to trust: (\S+)"))
    bundle.write_bytes(Path(certifi.where()).read_bytes() + ca.read_bytes())
    return bundle


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_banners_curl_line_runs_unchanged(banner, tmp_path):
    _bundle(banner, tmp_path)
    line = re.search(
        r"^ +(curl --cacert \S+ -x \S+ https://127\.0\.0\.1.*?')$", banner, re.M | re.S
    )
    assert line, banner
    out = subprocess.run(
        ["bash", "-c", line.group(1)],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert {m["id"] for m in json.loads(out.stdout)["data"]} >= {TEE}


def test_the_banners_python_line_runs_unchanged(banner, tmp_path):
    """The one-liner, with the variables the banner says to export, through a shell."""
    egress = field(banner, r"TEEGATE READY egress (\S+)")
    bundle = _bundle(banner, tmp_path)
    line = re.search(r"^  python (-c '.*?')$", banner, re.M | re.S)
    assert line, banner
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HTTPS_PROXY=egress, HTTP_PROXY=egress, SSL_CERT_FILE=str(bundle))
    out = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" {line.group(1)}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()
