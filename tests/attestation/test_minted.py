"""Quotes minted under the test DCAP PKI: what the gate accepts and what it refuses."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import dcap_qvl
import pytest

from teegate.catalog.attestation import Policy, verify_evidence
from teegate.catalog.attestation.binding import ethereum_address, expected_report_data
from teegate.sandbox.dcap_pki import DcapTestPki, TdMeasurements
from teegate.sandbox.evidence import SANDBOX_MRTD, EvidenceMinter
from tests.support.gpu_vectors import trusting_sandbox_gpus
from tests.support.tdx_vectors import NOW
from tests.support.testdata import REPO_ROOT

MODEL = "test/model-TEE"


def _verify(evidence: dict[str, Any], nonce: bytes, pki: DcapTestPki, **kw: Any):
    return verify_evidence(
        evidence,
        nonce=nonce,
        policy=trusting_sandbox_gpus(kw.pop("policy", Policy())),
        collateral=kw.pop("collateral", evidence.get("collateral")),
        now=kw.pop("now", NOW),
        root_ca_der=kw.pop("root_ca_der", pki.root_ca_der),
        model=MODEL,
        **kw,
    )


def test_minted_quote_verifies_under_the_test_root_only(pki: DcapTestPki) -> None:
    m = TdMeasurements(mrtd=hashlib.sha384(b"td").digest(), rtmrs=(bytes(48),) * 4)
    quote = pki.td_quote(bytes(range(64)), m)
    collateral = dcap_qvl.QuoteCollateralV3.from_json(
        json.dumps(pki.collateral(issue=NOW - 10, next_update=NOW + 10))
    )
    report = dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_ca_der, NOW)
    assert report.status == "UpToDate"
    with pytest.raises(ValueError):
        dcap_qvl.verify(quote, collateral, NOW)
    parsed = dcap_qvl.parse_quote(quote)
    assert parsed.quote_type() == "TDX" and parsed.header.version == 4
    assert parsed.report.report_data == bytes(range(64))
    assert parsed.report.mr_td == m.mrtd


def test_full_evidence_verifies(minter: EvidenceMinter, pki: DcapTestPki) -> None:
    nonce = os.urandom(32)
    verdict = _verify(minter.report(MODEL, nonce), nonce, pki)
    assert verdict.ok, verdict.reason
    assert verdict.root == "test"
    assert verdict.signing_address == minter.process_key.address_hex
    assert verdict.mrtd == SANDBOX_MRTD.hex()
    failed = [name for name, passed in verdict.checks.items() if not passed]
    assert failed == []
    for check in (
        "report_data_nonce",
        "request_nonce_matches",
        "report_data_signing_key",
        "signing_key_matches_address",
        "event_log_replays",
        "event_log_compose_hash",
        "app_compose_matches",
    ):
        assert verdict.checks[check] is True
    assert verdict.checks["gpu_evidence_verified"] is True
    assert verdict.gpu.ok and verdict.gpu.root == "test" and verdict.gpu.gpu_count == 2
    assert (verdict.gpu.measurements, verdict.gpu.revocation) == ("unverified", "unchecked")
    assert verdict.gpu.checks["gpu_nonce"] is True


def test_same_evidence_fails_under_intels_root(minter: EvidenceMinter, pki: DcapTestPki) -> None:
    nonce = os.urandom(32)
    verdict = _verify(minter.report(MODEL, nonce), nonce, pki, root_ca_der=None)
    assert not verdict.ok
    assert verdict.root == "intel"
    assert verdict.checks["quote_verified"] is False


def test_default_policy_never_uses_a_test_root() -> None:
    assert Policy().test_root_ca is None
    assert Policy().load_test_root() is None


def test_another_nonce_fails(minter: EvidenceMinter, pki: DcapTestPki) -> None:
    evidence = minter.report(MODEL, os.urandom(32))
    verdict = _verify(evidence, os.urandom(32), pki)
    assert not verdict.ok
    assert verdict.reason == "attestation failed: report_data does not bind our nonce"
    assert verdict.checks["request_nonce_matches"] is False


def test_claimed_signing_address_must_be_the_bound_one(
    minter: EvidenceMinter, pki: DcapTestPki
) -> None:
    nonce = os.urandom(32)
    evidence = minter.report(MODEL, nonce)
    evidence["signing_address"] = "0x" + "11" * 20
    verdict = _verify(evidence, nonce, pki)
    assert not verdict.ok
    assert verdict.reason == "attestation failed: report_data does not bind the signing key"


def test_public_key_must_belong_to_the_address(minter: EvidenceMinter, pki: DcapTestPki) -> None:
    nonce = os.urandom(32)
    evidence = minter.report(MODEL, nonce)
    other = EvidenceMinter(pki).process_key
    evidence["signing_public_key"] = other.public_xy.hex()
    verdict = _verify(evidence, nonce, pki)
    assert verdict.checks["signing_key_matches_address"] is False
    assert not verdict.ok


def test_ethereum_address_known_vector() -> None:
    # Private key 1: its address is well known.
    g = bytes.fromhex(
        "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
        "483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8"
    )
    assert ethereum_address(g).hex() == "7e5f4552091a69125d5dfcb7b8c2659029395bdf"


def test_tls_bound_report_data(pki: DcapTestPki) -> None:
    """report_data[0:32] = sha256(address || TLS cert fingerprint), checked only with the
    fingerprint the caller saw."""
    address = bytes.fromhex("ab" * 20)
    fingerprint = hashlib.sha256(b"the certificate").digest()
    nonce = os.urandom(32)
    report_data = hashlib.sha256(address + fingerprint).digest() + nonce
    quote = pki.td_quote(report_data, TdMeasurements(mrtd=SANDBOX_MRTD, rtmrs=(bytes(48),) * 4))
    evidence = {"intel_quote": quote.hex(), "signing_address": "0x" + address.hex()}
    collateral = pki.collateral(issue=NOW - 10, next_update=NOW + 10)
    seen = _verify(evidence, nonce, pki, collateral=collateral, tls_fingerprint=fingerprint)
    assert seen.ok, seen.reason
    unseen = _verify(evidence, nonce, pki, collateral=collateral)
    assert unseen.checks["report_data_signing_key"] is False
    other = _verify(evidence, nonce, pki, collateral=collateral, tls_fingerprint=bytes(32))
    assert other.checks["report_data_signing_key"] is False


@pytest.mark.parametrize(
    ("mode", "check", "reason"),
    [
        ("stale", "collateral_current", "collateral expired at"),
        ("debug", "not_debug", "debug TD (td_attributes debug bit set)"),
        ("wrong_binding", "report_data_nonce", "report_data does not bind our nonce"),
        ("bad_mrtd", "mrtd_allowed", "is not on the allow-list"),
        ("sgx", "tee_type_tdx", "TEE type SGX is not TDX"),
    ],
)
def test_each_evidence_switch_is_refused_for_its_reason(
    minter: EvidenceMinter, pki: DcapTestPki, mode: str, check: str, reason: str
) -> None:
    policy = Policy(mrtd_allowlist=(SANDBOX_MRTD.hex(),))
    nonce = os.urandom(32)
    assert _verify(minter.report(MODEL, nonce), nonce, pki, policy=policy).ok
    minter.set_mode(MODEL, mode)
    verdict = _verify(minter.report(MODEL, nonce), nonce, pki, policy=policy)
    assert not verdict.ok
    assert verdict.checks[check] is False
    assert verdict.reason.startswith("attestation failed: ")
    assert reason in verdict.reason


def test_debug_td_is_also_refused_by_dcap_qvl(minter: EvidenceMinter, pki: DcapTestPki) -> None:
    minter.set_mode(MODEL, "debug")
    nonce = os.urandom(32)
    verdict = _verify(minter.report(MODEL, nonce), nonce, pki)
    assert verdict.checks["quote_verified"] is False


def test_rotate_key_binds_a_new_key(minter: EvidenceMinter, pki: DcapTestPki) -> None:
    nonce = os.urandom(32)
    before = _verify(minter.report(MODEL, nonce), nonce, pki)
    minter.set_mode(MODEL, "rotate_key")
    after = _verify(minter.report(MODEL, nonce), nonce, pki)
    assert before.ok and after.ok
    assert after.signing_address != before.signing_address
    assert (
        after.report_data
        == expected_report_data(
            bytes.fromhex(after.signing_address.removeprefix("0x")), nonce
        ).hex()
    )


def test_all_attestations_must_all_pass(minter: EvidenceMinter, pki: DcapTestPki) -> None:
    nonce = os.urandom(32)
    first = minter.report(MODEL, nonce)
    minter.set_mode(MODEL, "rotate_key")
    second = minter.report(MODEL, nonce)
    both = {**first, "all_attestations": [first, second]}
    # One sandbox, so both "TDs" report the same test GPUs, which the GPU part refuses
    # (tests/attestation/test_gpu_verdict.py): this test is about the TDs.
    record = Policy(gpu_evidence="record")
    verdict = _verify(both, nonce, pki, collateral=lambda q: first["collateral"], policy=record)
    assert verdict.ok, verdict.reason
    assert verdict.signing_addresses == (first["signing_address"], second["signing_address"])
    minter.set_mode(MODEL, "wrong_binding")
    third = minter.report(MODEL, nonce)
    mixed = {**first, "all_attestations": [first, third]}
    verdict = _verify(mixed, nonce, pki, collateral=lambda q: first["collateral"], policy=record)
    assert not verdict.ok
    assert verdict.reason == "attestation failed: TD 1: report_data does not bind our nonce"


@pytest.mark.parametrize(
    "evidence",
    [
        {},
        {"intel_quote": "zz"},
        {"intel_quote": 5},
        {"intel_quote": "00", "info": "{not json"},
        {"intel_quote": "00", "event_log": {"a": 1}},
        {"intel_quote": "00", "signing_algo": "rsa"},
        {"all_attestations": "nope"},
    ],
)
def test_malformed_evidence_is_refused(evidence: dict, pki: DcapTestPki) -> None:
    verdict = _verify(evidence, bytes(32), pki, collateral=None)
    assert not verdict.ok
    assert verdict.reason.startswith("attestation failed: malformed evidence: ")
    assert verdict.checks == {"evidence_well_formed": False}


def test_garbage_quote_is_refused(pki: DcapTestPki) -> None:
    verdict = _verify({"intel_quote": "00" * 100}, bytes(32), pki, collateral=None)
    assert not verdict.ok
    assert verdict.checks["quote_parses"] is False


def test_test_root_is_stable_across_processes(pki: DcapTestPki) -> None:
    """Keys come from a fixed seed and signatures are deterministic, so another process
    builds the very same root certificate (it can be pinned in configuration)."""
    code = (
        "import sys; from sandbox.dcap_pki import DcapTestPki; "
        "sys.stdout.write(DcapTestPki().root_ca_der.hex())"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert bytes.fromhex(other) == pki.root_ca_der
    assert DcapTestPki(seed=b"another seed").root_ca_der != pki.root_ca_der
