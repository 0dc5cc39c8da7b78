"""The GPU part of a model's verdict: verified with the quote's nonce, refusing the model
when it fails, and the ``gpu_evidence`` policy (verify / require / record)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from teegate.attestation_settings import resolve
from teegate.catalog.attestation import Policy, load_policy, verify_evidence
from teegate.catalog.attestation.gpu import GpuVerdict
from teegate.sandbox.dcap_pki import DcapTestPki
from tests.support.gpu_vectors import GPU_VECTORS, sandbox_gpu_root_file, trusting_sandbox_gpus
from tests.support.tdx_vectors import NOW

MODEL = "test/model-TEE"


def _verify(evidence: dict[str, Any], nonce: bytes, pki: DcapTestPki, policy: Policy):
    return verify_evidence(
        evidence,
        nonce=nonce,
        policy=policy,
        collateral=lambda _quote: evidence["collateral"],
        now=NOW,
        root_ca_der=pki.root_ca_der,
        model=MODEL,
    )


@pytest.fixture
def trusted() -> Policy:
    return trusting_sandbox_gpus(Policy())


def test_valid_gpus_pass_and_say_what_was_not_checked(minter, pki, trusted) -> None:
    nonce = os.urandom(32)
    v = _verify(minter.report(MODEL, nonce), nonce, pki, trusted)
    assert v.ok, v.reason
    assert isinstance(v.gpu, GpuVerdict) and v.gpu.ok and v.gpu.gpu_count == 2
    assert v.checks["gpu_evidence_verified"] is True
    assert "gpu: gpu_measurements: no RIM files supplied (NVIDIA's RIM service is online)" in (
        v.skipped
    )
    assert v.gpu_summary()["measurements"] == "unverified"
    assert "gpus" not in v.gpu_summary()


def test_nvidia_root_refuses_the_test_gpus(minter, pki) -> None:
    nonce = os.urandom(32)
    v = _verify(minter.report(MODEL, nonce), nonce, pki, Policy())
    assert not v.ok and v.checks["quote_verified"] is True
    assert v.reason.startswith("attestation failed: GPU evidence rejected: GPU 0: ")
    assert "NVIDIA Device Identity CA" in v.reason


def test_stale_gpu_nonce_refuses_the_model(minter, pki, trusted) -> None:
    nonce = os.urandom(32)
    minter.set_mode(MODEL, "gpu_stale_nonce")
    v = _verify(minter.report(MODEL, nonce), nonce, pki, trusted)
    assert not v.ok and v.checks["report_data_nonce"] is True
    assert v.gpu.checks["gpu_nonce"] is False and v.gpu.checks["gpu_spdm_signature"] is True
    assert "not ours (stale or canned evidence)" in v.reason


def test_no_gpu_evidence(minter, pki, trusted) -> None:
    nonce = os.urandom(32)
    minter.set_mode(MODEL, "no_gpu")
    evidence = minter.report(MODEL, nonce)
    v = _verify(evidence, nonce, pki, trusted)
    assert v.ok and v.gpu == "absent" and "gpu: no GPU evidence" in v.skipped
    required = trusted.model_copy(update={"gpu_evidence": "require"})
    v = _verify(evidence, nonce, pki, required)
    assert not v.ok and v.reason == "attestation failed: no GPU evidence, and policy requires it"


def test_record_only_never_claims_verification(minter, pki) -> None:
    nonce = os.urandom(32)
    minter.set_mode(MODEL, "gpu_stale_nonce")
    v = _verify(minter.report(MODEL, nonce), nonce, pki, Policy(gpu_evidence="record"))
    assert v.ok and v.gpu == "unverified"
    assert "gpu: nvidia_payload recorded, not verified" in v.skipped


def test_expected_count(minter, pki, trusted) -> None:
    nonce = os.urandom(32)
    evidence = minter.report(MODEL, nonce)
    assert _verify(evidence, nonce, pki, trusted.model_copy(update={"gpu_count": 2})).ok
    v = _verify(evidence, nonce, pki, trusted.model_copy(update={"gpu_count": 8}))
    assert not v.ok and v.reason.endswith("2 GPUs reported, policy expects 8")


def test_every_td_gpu_part_must_pass(minter, pki, trusted) -> None:
    nonce = os.urandom(32)
    first = minter.report(MODEL, nonce)
    minter.set_mode(MODEL, "gpu_stale_nonce")
    second = minter.report(MODEL, nonce)
    minter.set_mode(MODEL, "no_gpu")
    bare = minter.report(MODEL, nonce)
    required = trusted.model_copy(update={"gpu_evidence": "require"})
    v = _verify({**first, "all_attestations": [first, bare]}, nonce, pki, required)
    assert not v.ok and v.reason.endswith("TD 1 sent none, and policy requires it")
    # A stale TD refuses the model.
    v = _verify({**first, "all_attestations": [first, second]}, nonce, pki, trusted)
    assert not v.ok and v.reason.startswith("attestation failed: TD 1: GPU evidence rejected")
    assert v.gpu.gpu_count == 4
    # Each TD's GPUs verify alone, but one GPU cannot serve two TDs.
    minter.set_mode(MODEL, "valid")
    again = minter.report(MODEL, nonce)
    v = _verify({**first, "all_attestations": [first, again]}, nonce, pki, trusted)
    assert not v.ok and v.gpu.checks["gpu_distinct"] is False
    assert v.reason == (
        "attestation failed: GPU evidence rejected: the same GPU is reported by two TDs"
    )


def test_unreadable_test_root_fails_closed(minter, pki, tmp_path: Path) -> None:
    nonce = os.urandom(32)
    policy = Policy(gpu_test_root_ca=tmp_path / "missing.pem")
    v = _verify(minter.report(MODEL, nonce), nonce, pki, policy)
    assert not v.ok and "test GPU root unreadable" in v.reason


def test_policy_file_paths_resolve_beside_it(tmp_path: Path) -> None:
    (tmp_path / "rims").mkdir()
    (tmp_path / "root.pem").write_bytes(sandbox_gpu_root_file().read_bytes())
    toml = tmp_path / "proxy.toml"
    toml.write_text(
        '[attestation]\ngpu_rim_dir = "rims"\ngpu_test_root_ca = "root.pem"\ngpu_count = 2\n'
    )
    policy = load_policy(toml)
    assert policy.gpu_rim_dir == tmp_path / "rims" and policy.gpu_count == 2
    assert policy.gpu_requirements().test_root is not None
    assert resolve(Policy(gpu_rim_dir=Path("rims")), tmp_path).gpu_rim_dir == tmp_path / "rims"
    with pytest.raises(ValueError, match="gpu_ocsp_dir"):
        resolve(Policy(gpu_ocsp_dir=Path("nope")), tmp_path)
    with pytest.raises(ValueError, match="gpu_test_root_ca"):
        resolve(Policy(gpu_test_root_ca=GPU_VECTORS / "MANIFEST.json"), tmp_path)
    with pytest.raises(ValueError):
        Policy(gpu_evidence="maybe")
    with pytest.raises(ValueError):
        Policy(gpu_count=0)
