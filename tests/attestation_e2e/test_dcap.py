"""dcap mode end to end: the gateway serves a model only under a verified TDX quote.

Real processes: the sandbox mints quotes under its test PKI, the gateway verifies them with
dcap-qvl against that test root (configured as a test would: ``attestation.test_root_ca``),
re-attesting every second. Each test flips a different model, so they cannot disturb each
other through the shared processes.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import httpx
import openai
import pytest

from teegate.catalog.attestation import Policy, verify_evidence
from tests.support.clients import chat_count
from tests.support.reattest import MSG, gpu_root_file, refusal, root_ca, until

VALID = "deepseek-ai/DeepSeek-V3.2-TEE"
NON_TEE = "deepseek-ai/DeepSeek-V3"
HEADERS = (
    "x-teegate-attestation-mode",
    "x-teegate-attested-at",
    "x-teegate-quote-sha256",
    "x-teegate-signing-address",
    "x-teegate-attestation-root",
)


def report(http: httpx.Client, model: str, **params: str) -> httpx.Response:
    return http.get("/v1/attestation/report", params={"model": model, **params})


def backing(rep: dict) -> dict[str, str]:
    """The response headers a chat completion served under this report's verdict carries."""
    v = rep["verdict"]
    return {
        "x-teegate-attestation-mode": "dcap",
        "x-teegate-attested-at": str(v["verified_at"]),
        "x-teegate-quote-sha256": v["quote_sha256"],
        "x-teegate-signing-address": v["signing_address"],
        "x-teegate-attestation-root": "test",
    }


def served_headers(http, client: openai.OpenAI, model: str, stream: bool) -> tuple[dict, dict]:
    """(headers of a served completion, the report of the verdict it was served under).

    The verdict changes every second (re-attestation), so a report is read before and after
    the completion, and the pair is used only when no re-attestation fell in between.
    """
    for _ in range(20):
        before = report(http, model).json()
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=MSG, stream=stream
        )
        if stream:
            list(raw.parse())
        after = report(http, model).json()
        if before["verdict"]["quote_sha256"] == after["verdict"]["quote_sha256"]:
            return {h: raw.headers.get(h) for h in HEADERS}, after
    raise AssertionError("the verdict never stayed put across one completion")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_valid_evidence_is_served_with_headers_matching_the_report(http, client, stream):
    headers, rep = served_headers(http, client, VALID, stream)
    assert rep["mode"] == "dcap" and rep["verified"] is True and rep["served"] is True
    assert headers == backing(rep)
    # The quote hash is the hash of the quote the report hands out, not a label.
    quote = bytes.fromhex(rep["evidence"]["intel_quote"])
    assert hashlib.sha256(quote).hexdigest() == headers["x-teegate-quote-sha256"]
    assert rep["evidence"]["signing_address"] == headers["x-teegate-signing-address"]
    assert rep["verdict"]["tcb_status"] == "UpToDate" and rep["verdict"]["root"] == "test"
    assert abs(int(headers["x-teegate-attested-at"]) - time.time()) < 60


def test_model_list_carries_the_attestation_of_each_model(http):
    models = http.get("/v1/models")
    assert models.headers["x-teegate-attestation-mode"] == "dcap"
    data = {m["id"]: m for m in models.json()["data"]}
    assert VALID in data
    for m in data.values():
        att = m["attestation"]
        assert att["mode"] == "dcap" and att["verified"] is True, att
        assert att["tcb_status"] == "UpToDate" and att["root"] == "test"
        assert len(att["quote_sha256"]) == 64 and att["signing_address"].startswith("0x")
        assert att["verified_at"] < att["expires_at"]
        gpu = att["gpu"]  # the sandbox's two test GPUs, verified with the same nonce
        assert gpu["ok"] is True and gpu["root"] == "test" and gpu["gpu_count"] == 2, gpu
        assert (gpu["measurements"], gpu["revocation"]) == ("unverified", "unchecked")
    one = http.get(f"/v1/models/{VALID}").json()
    assert one["attestation"]["verified"] is True


CASES = [
    ("stale", "deepseek-ai/DeepSeek-V3.1-Terminus-TEE", "collateral expired"),
    ("debug", "deepseek-ai/DeepSeek-V3.1-TEE", "debug TD"),
    ("wrong_binding", "deepseek-ai/DeepSeek-V3-0324-TEE", "report_data does not bind our nonce"),
    ("bad_mrtd", "deepseek-ai/DeepSeek-R1-0528-TEE", "is not on the allow-list"),
    ("sgx", "tngtech/DeepSeek-TNG-R1T2-Chimera-TEE", "is not TDX"),
    # GPU evidence whose signed SPDM request carries an old nonce (canned or replayed).
    ("gpu_stale_nonce", "zai-org/GLM-5.1-TEE", "GPU evidence rejected: GPU 0: the signed SPDM"),
    # No nvidia_payload at all, and this module's gateway has gpu_evidence = "require".
    ("no_gpu", "zai-org/GLM-4.7-TEE", "no GPU evidence, and policy requires it"),
]


@pytest.mark.parametrize(("mode", "model", "why"), CASES, ids=[c[0] for c in CASES])
def test_bad_evidence_takes_the_model_out_of_service_at_the_next_reattestation(
    http, client, upstream, evidence, mode, model, why
):
    assert refusal(client, model) is None  # served while its evidence is valid
    evidence(model, mode)
    body = until(lambda: refusal(client, model), f"{model} refused after {mode}")
    assert body["status"] == 400 and body["code"] == "model_not_confidential"
    assert "attestation failed" in body["message"] and why in body["message"], body["message"]
    # Refused locally: nothing reaches the upstream, and the list no longer offers it.
    sent = chat_count(upstream)
    assert refusal(client, model)["code"] == "model_not_confidential"
    assert chat_count(upstream) == sent
    assert model not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    one = http.get(f"/v1/models/{model}")
    assert one.status_code == 404 and why in one.json()["error"]["message"]
    rep = report(http, model).json()
    assert rep["served"] is False and rep["verified"] is False and why in rep["refusal"]
    # Valid evidence again: back in service at the next re-attestation.
    evidence(model, "valid")
    until(lambda: refusal(client, model) is None, f"{model} served again")


def test_a_rotated_signing_key_is_what_the_headers_then_name(http, client, evidence):
    model = "Qwen/Qwen3-32B-TEE"
    old = report(http, model).json()["verdict"]["signing_address"]
    new = evidence(model, "rotate_key")["signing_addresses"][model]
    assert new != old
    until(lambda: report(http, model).json()["verdict"]["signing_address"] == new, "the new key")
    headers, rep = served_headers(http, client, model, stream=False)
    assert headers["x-teegate-signing-address"] == new == rep["evidence"]["signing_address"]


def test_client_nonce_yields_evidence_bound_to_it_that_the_client_can_verify(
    http, upstream, tmp_path
):
    model = "Qwen/Qwen3.5-397B-A17B-TEE"
    nonce = secrets.token_bytes(32)
    rep = report(http, model, nonce=nonce.hex())
    assert rep.status_code == 200
    body = rep.json()
    assert body["fresh"] is True and body["nonce"] == nonce.hex()
    assert body["verified"] is True and body["verdict"]["nonce"] == nonce.hex()
    ev = body["evidence"]
    assert ev["request_nonce"] == nonce.hex()
    # Verify it here, independently of the gateway, against the sandbox's test root.
    root = root_ca(upstream)
    policy = Policy(
        mrtd_allowlist=(root.headers["x-sandbox-mrtd"],),
        gpu_test_root_ca=gpu_root_file(upstream, tmp_path),
    )
    mine = verify_evidence(
        ev,
        nonce=nonce,
        policy=policy,
        collateral=ev["collateral"],
        now=int(time.time()),
        root_ca_der=root.content,
        model=model,
    )
    assert mine.ok, mine.reason
    assert mine.gpu.ok and mine.gpu.checks["gpu_nonce"] is True
    assert mine.report_data.endswith(nonce.hex())
    assert mine.quote_sha256 == body["verdict"]["quote_sha256"]
    # The same evidence does not pass for another nonce: it is bound to this one.
    other = verify_evidence(
        ev,
        nonce=secrets.token_bytes(32),
        policy=policy,
        collateral=ev["collateral"],
        now=int(time.time()),
        root_ca_der=root.content,
    )
    assert not other.ok and "does not bind our nonce" in other.reason


def test_the_cached_report_verifies_under_the_gateways_own_nonce(http, upstream, tmp_path):
    body = report(http, VALID).json()
    assert body["fresh"] is False and body["nonce"] == body["verdict"]["nonce"]
    root = root_ca(upstream)
    ev = body["evidence"]
    mine = verify_evidence(
        ev,
        nonce=bytes.fromhex(body["nonce"]),
        policy=Policy(gpu_test_root_ca=gpu_root_file(upstream, tmp_path)),
        collateral=ev["collateral"],
        now=int(time.time()),
        root_ca_der=root.content,
    )
    assert mine.ok, mine.reason
    assert mine.quote_sha256 == body["verdict"]["quote_sha256"]


@pytest.mark.parametrize(
    ("params", "status", "code", "param"),
    [
        ({"model": VALID, "nonce": "ab" * 31}, 400, "invalid_value", "nonce"),
        ({"model": VALID, "nonce": "ab" * 33}, 400, "invalid_value", "nonce"),
        ({"model": VALID, "nonce": "zz" * 32}, 400, "invalid_value", "nonce"),
        ({"model": VALID, "nonce": ""}, 400, "invalid_value", "nonce"),
        ({"model": VALID, "signing_algo": "ed25519"}, 400, "invalid_value", "signing_algo"),
        ({}, 400, "missing_required_parameter", "model"),
        ({"model": NON_TEE}, 404, "model_not_confidential", "model"),
        ({"model": "nobody/nothing"}, 404, "model_not_found", "model"),
    ],
)
def test_report_refusals(http, params, status, code, param):
    resp = http.get("/v1/attestation/report", params=params)
    assert resp.status_code == status
    err = resp.json()["error"]
    assert (err["code"], err["param"]) == (code, param)


def test_report_needs_a_key_and_get(gateway, http):
    anonymous = httpx.get(f"{gateway.base_url}/v1/attestation/report", params={"model": VALID})
    assert anonymous.status_code == 401
    post = http.post("/v1/attestation/report", params={"model": VALID})
    assert post.status_code == 405 and post.headers["allow"] == "GET"


def test_every_response_names_the_mode(http):
    for resp in (
        http.get("/v1/models"),
        http.get("/v1/nothing"),
        http.post("/v1/chat/completions", json={"model": NON_TEE, "messages": MSG}),
    ):
        assert resp.headers["x-teegate-attestation-mode"] == "dcap", resp.text
        assert "x-teegate-quote-sha256" not in resp.headers  # nothing was served under a quote


def test_the_test_root_is_announced_loudly(gateway):
    log = gateway.log_text()
    assert "WARNING: attestation.test_root_ca is set" in log  # plain, whatever the log level
    assert "attestation_test_root_in_use" in log
