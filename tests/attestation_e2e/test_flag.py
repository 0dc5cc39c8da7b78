"""flag mode end to end: the catalog's flag is trusted, and nothing claims otherwise.

No response of a flag-mode gateway may look like a hardware verification: no quote hash,
no signing address, no verification time, ``verified`` false everywhere, no verdict in the
report. And since nothing is verified, bad evidence upstream changes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.reattest import FAST, MSG, refusal, until
from tests.support.sandbox_proc import SandboxProc

TEE = "deepseek-ai/DeepSeek-V3.2-TEE"
REPORT = "GET /v1/attestation/report"
CLAIMS = (
    "x-teegate-attested-at",
    "x-teegate-quote-sha256",
    "x-teegate-signing-address",
    "x-teegate-attestation-root",
)


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    with start_gateway(upstream.base_url, extra_toml=FAST, attestation="flag") as gw:
        yield gw


def test_completions_say_flag_and_claim_no_verification(client: openai.OpenAI):
    for stream in (False, True):
        raw = client.chat.completions.with_raw_response.create(
            model=TEE, messages=MSG, stream=stream
        )
        if stream:
            list(raw.parse())
        assert raw.headers["x-teegate-attestation-mode"] == "flag"
        assert not [h for h in CLAIMS if h in raw.headers]


def test_model_list_says_flag_and_unverified(http: httpx.Client):
    resp = http.get("/v1/models")
    assert resp.headers["x-teegate-attestation-mode"] == "flag"
    data = resp.json()["data"]
    assert data
    for m in data:
        att = m["attestation"]
        assert att["mode"] == "flag" and att["verified"] is False
        assert "no hardware attestation" in att["basis"]
        for field in (
            "verified_at",
            "expires_at",
            "tcb_status",
            "quote_sha256",
            "signing_address",
            "root",
        ):
            assert att[field] is None, field


def test_report_has_no_verdict_only_the_upstreams_unchecked_evidence(http: httpx.Client):
    cached = http.get("/v1/attestation/report", params={"model": TEE}).json()
    assert cached["mode"] == "flag" and cached["verified"] is False and cached["verdict"] is None
    nonce = secrets.token_hex(32)
    fresh = http.get("/v1/attestation/report", params={"model": TEE, "nonce": nonce}).json()
    assert fresh["verified"] is False and fresh["verdict"] is None
    assert fresh["evidence"]["request_nonce"] == nonce  # handed over, not vouched for


def test_flag_mode_fetches_no_evidence_and_bad_evidence_changes_nothing(
    client: openai.OpenAI, upstream: SandboxProc, evidence
):
    model = "Qwen/Qwen3-32B-TEE"
    evidence(model, "debug")
    routes = upstream.stats()["by_route"]
    reports, refreshes = routes.get(REPORT, 0), routes.get("GET /v1/models", 0)
    # Two more catalog refreshes (one a second): a dcap gateway would have re-attested by now.
    until(
        lambda: upstream.stats()["by_route"].get("GET /v1/models", 0) >= refreshes + 2,
        "two catalog refreshes",
    )
    assert upstream.stats()["by_route"].get(REPORT, 0) == reports
    assert refusal(client, model) is None
