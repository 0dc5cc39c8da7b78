"""The sandbox process serves NEAR AI-format evidence the gateway's verifier judges correctly.

A real ``python -m teegate.sandbox`` process, reached over HTTP by ``NearAiSource``: each evidence
switch must produce its own refusal reason, and valid evidence must verify end to end.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from teegate.catalog.attestation import AttestationService, NearAiSource, Policy, Verdict
from tests.support.sandbox_proc import SandboxProc, start_sandbox


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProc]:
    with start_sandbox() as proc:
        yield proc


@pytest.fixture(scope="module")
def catalog(sandbox: SandboxProc) -> list[dict[str, Any]]:
    with sandbox.client(timeout=10.0) as api:
        return api.get("/models").json()["data"]


@pytest.fixture(scope="module")
def published(sandbox: SandboxProc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The root CA and MRTD the sandbox publishes, as ``teegate sandbox`` would pin them."""
    resp = httpx.get(f"{sandbox.base_url}/_sandbox/evidence/root_ca.der", timeout=10.0)
    resp.raise_for_status()
    folder = tmp_path_factory.mktemp("sandbox-root")
    root = folder / "root.der"
    root.write_bytes(resp.content)
    gpu = httpx.get(f"{sandbox.base_url}/_sandbox/evidence/gpu_root_ca.pem", timeout=10.0)
    gpu.raise_for_status()
    (folder / "gpu-root.pem").write_bytes(gpu.content)
    return {"root": root, "mrtd": resp.headers["X-Sandbox-Mrtd"], "gpu": folder / "gpu-root.pem"}


@pytest.fixture
def policy(published: dict[str, Any]) -> Policy:
    return Policy(
        test_root_ca=published["root"],
        mrtd_allowlist=(published["mrtd"],),
        gpu_test_root_ca=published["gpu"],
    )


@pytest.fixture
async def service(sandbox: SandboxProc, policy: Policy) -> AsyncIterator[AttestationService]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        yield AttestationService(NearAiSource(sandbox.base_url, sandbox.api_key, client), policy)


def _confidential(catalog: list[dict[str, Any]], index: int) -> str:
    return [m["id"] for m in catalog if m.get("confidential_compute") is True][index]


def _switch(sandbox: SandboxProc, model: str, mode: str) -> dict[str, Any]:
    resp = httpx.post(f"{sandbox.base_url}/_sandbox/evidence", json={model: mode}, timeout=10.0)
    resp.raise_for_status()
    return resp.json()


async def test_valid_evidence_verifies(
    service: AttestationService, sandbox: SandboxProc, catalog: list[dict[str, Any]]
) -> None:
    model = _confidential(catalog, 0)
    _switch(sandbox, model, "valid")
    verdict = await service.attest_now(model)
    assert verdict.ok, verdict.reason
    assert verdict.root == "test" and verdict.tee_type == "TDX"
    assert [name for name, passed in verdict.checks.items() if not passed] == []
    for check in (
        "mrtd_allowed",
        "event_log_replays",
        "event_log_compose_hash",
        "app_compose_matches",
        "signing_key_matches_address",
        "report_data_nonce",
    ):
        assert verdict.checks[check] is True
    assert verdict.gpu != "unverified" and verdict.gpu.ok and verdict.gpu.root == "test"
    assert "nvidia_payload" in verdict.evidence and "collateral" in verdict.evidence


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("stale", "attestation failed: collateral expired at "),
        ("debug", "attestation failed: debug TD (td_attributes debug bit set)"),
        ("wrong_binding", "attestation failed: report_data does not bind our nonce"),
        ("bad_mrtd", "attestation failed: MRTD "),
        ("sgx", "attestation failed: TEE type SGX is not TDX"),
    ],
)
async def test_each_switch_is_refused_for_its_reason(
    service: AttestationService,
    sandbox: SandboxProc,
    catalog: list[dict[str, Any]],
    mode: str,
    reason: str,
) -> None:
    model = _confidential(catalog, 1)
    _switch(sandbox, model, mode)
    try:
        verdict: Verdict = await service.attest_now(model)
    finally:
        _switch(sandbox, model, "valid")
    assert not verdict.ok
    assert verdict.reason.startswith(reason), verdict.reason
    assert (await service.attest_now(model)).ok  # and back to valid


async def test_rotate_key_is_noticed_and_reattested(
    service: AttestationService, sandbox: SandboxProc, catalog: list[dict[str, Any]]
) -> None:
    model = _confidential(catalog, 2)
    service.set_models([model])
    before = await service.attest_now(model)
    assert service.refusal(model) is None
    published = _switch(sandbox, model, "rotate_key")
    new_address = published["signing_addresses"][model]
    assert new_address != before.signing_address
    service.note_signing_key(model, new_address)
    assert (
        service.refusal(model) == "attestation failed: upstream signing key changed, re-attesting"
    )
    after = await service.attest_now(model)
    assert after.ok and after.signing_address == new_address
    assert service.refusal(model) is None


async def test_intels_root_refuses_the_sandbox(
    sandbox: SandboxProc, catalog: list[dict[str, Any]], published: dict[str, Any]
) -> None:
    """Without the explicit test root, shipped collateral is ignored and PCCS is asked: here
    an unreachable one, so the model is refused rather than trusted."""
    model = _confidential(catalog, 0)
    policy = Policy(pccs_url="http://127.0.0.1:9", fetch_timeout_s=5)
    async with httpx.AsyncClient(timeout=10.0) as client:
        svc = AttestationService(NearAiSource(sandbox.base_url, sandbox.api_key, client), policy)
        verdict = await svc.attest_now(model)
    assert not verdict.ok
    assert verdict.reason.startswith("attestation failed: collateral unavailable: ")


def test_non_confidential_models_have_no_evidence(
    sandbox: SandboxProc, catalog: list[dict[str, Any]]
) -> None:
    plain = next(m["id"] for m in catalog if m.get("confidential_compute") is not True)
    with sandbox.client(timeout=10.0) as api:
        params = {"model": plain, "nonce": os.urandom(32).hex(), "signing_algo": "ecdsa"}
        assert api.get("/attestation/report", params=params).status_code == 404
        params["model"] = "no/such-model"
        assert api.get("/attestation/report", params=params).status_code == 404


@pytest.mark.parametrize(
    "params",
    [
        {"nonce": "00" * 32},
        {"model": "M", "nonce": "00" * 31},
        {"model": "M", "nonce": "zz" * 32},
        {"model": "M", "nonce": "00" * 32, "signing_algo": "ed25519"},
    ],
)
def test_bad_requests(sandbox: SandboxProc, catalog: list[dict[str, Any]], params: dict) -> None:
    if params.get("model") == "M":
        params = {**params, "model": _confidential(catalog, 0)}
    with sandbox.client(timeout=10.0) as api:
        assert api.get("/attestation/report", params=params).status_code == 400


def test_evidence_needs_the_upstream_key(
    sandbox: SandboxProc, catalog: list[dict[str, Any]]
) -> None:
    params = {"model": _confidential(catalog, 0), "nonce": "00" * 32}
    resp = httpx.get(f"{sandbox.api_base}/attestation/report", params=params, timeout=10.0)
    assert resp.status_code == 401


def test_unknown_switch_is_refused(sandbox: SandboxProc) -> None:
    resp = httpx.post(f"{sandbox.base_url}/_sandbox/evidence", json={"m": "sneaky"}, timeout=10.0)
    assert resp.status_code == 400


def test_published_json_agrees_with_the_der_endpoint(
    sandbox: SandboxProc, catalog: list[dict[str, Any]], published: dict[str, Any]
) -> None:
    info = httpx.get(f"{sandbox.base_url}/_sandbox/evidence", timeout=10.0).json()
    assert info["mrtd"] == published["mrtd"]
    assert bytes.fromhex(info["root_ca_der"]) == Path(published["root"]).read_bytes()
