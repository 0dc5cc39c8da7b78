"""Real Intel quotes: the verifier agrees with the manifest, and refuses any tampering."""

from __future__ import annotations

import dcap_qvl
import pytest

from teegate.catalog.attestation import Policy, verify_evidence
from teegate.catalog.attestation.collateral import collateral_window, load_collateral
from tests.support.tdx_vectors import MANIFEST, collateral_text, quote_bytes, vector

HEADER_AND_BODY = 48 + 584  # what the attestation key signs in a TDX quote


def _verify(name: str, *, quote: bytes | None = None, at: int | None = None, policy=None):
    return verify_evidence(
        {"intel_quote": (quote or quote_bytes(name)).hex()},
        nonce=None,
        policy=policy or Policy(),
        collateral=collateral_text(name),
        now=vector(name)["at"] if at is None else at,
        require_binding=False,
    )


@pytest.mark.parametrize("v", MANIFEST, ids=lambda v: v["dir"])
def test_dcap_qvl_agrees_with_the_manifest(v: dict) -> None:
    quote = quote_bytes(v["dir"])
    collateral = load_collateral(collateral_text(v["dir"]))
    expect = v["expect"]
    if "error_contains" in expect:
        with pytest.raises(ValueError, match=expect["error_contains"]):
            dcap_qvl.verify(quote, collateral, v["at"])
    else:
        report = dcap_qvl.verify(quote, collateral, v["at"])
        assert report.status == expect["status"]
        assert list(report.advisory_ids) == expect["advisory_ids"]


@pytest.mark.parametrize("v", MANIFEST, ids=lambda v: v["dir"])
def test_verdict_matches_the_manifest(v: dict) -> None:
    verdict = _verify(v["dir"])
    expect = v["expect"]
    if "error_contains" in expect:
        assert not verdict.ok
        assert expect["error_contains"] in verdict.reason
        assert verdict.checks["quote_verified"] is False
    elif v["tee"] == "sgx":
        # dcap-qvl verifies it, but a TDX gate must not take an SGX enclave quote.
        assert verdict.checks["quote_verified"] is True
        assert verdict.tcb_status == expect["status"]
        assert list(verdict.advisory_ids) == expect["advisory_ids"]
        assert not verdict.ok
        assert verdict.reason == "attestation failed: TEE type SGX is not TDX"
    else:
        assert verdict.ok, verdict.reason
        assert verdict.tee_type == "TDX"
        assert verdict.tcb_status == expect["status"]
        assert list(verdict.advisory_ids) == expect["advisory_ids"]
        assert verdict.root == "intel"


def test_verdict_reports_the_quote_fields() -> None:
    verdict = _verify("dcap-qvl-tdx-v4")
    parsed = dcap_qvl.parse_quote(quote_bytes("dcap-qvl-tdx-v4")).report
    assert verdict.mrtd == parsed.mr_td.hex()
    assert verdict.rtmrs == tuple(getattr(parsed, f"rt_mr{i}").hex() for i in range(4))
    assert verdict.report_data == parsed.report_data.hex()
    assert verdict.gpu == "absent"  # a bare quote: no GPU evidence


@pytest.mark.parametrize("offset", [6, 48 + 16, 48 + 136, 48 + 520, HEADER_AND_BODY - 1])
def test_flipping_a_signed_byte_fails(offset: int) -> None:
    tampered = bytearray(quote_bytes("dcap-qvl-tdx-v4"))
    tampered[offset] ^= 0x01
    verdict = _verify("dcap-qvl-tdx-v4", quote=bytes(tampered))
    assert not verdict.ok
    assert verdict.checks.get("quote_verified") is not True


@pytest.mark.parametrize("name", ["dcap-qvl-tdx-v4", "dstack-nearai"])
def test_outside_the_collateral_window_fails(name: str) -> None:
    window = collateral_window(load_collateral(collateral_text(name)))
    assert _verify(name).ok
    for at in (window.next_update + 1, window.issued - 1):
        verdict = _verify(name, at=at)
        assert not verdict.ok
        assert verdict.checks["collateral_current"] is False
        assert verdict.checks["quote_verified"] is False  # dcap-qvl refuses it as well


def test_verdict_never_outlives_the_collateral() -> None:
    at = vector("dcap-qvl-tdx-v4")["at"]
    window = collateral_window(load_collateral(collateral_text("dcap-qvl-tdx-v4")))
    verdict = _verify("dcap-qvl-tdx-v4")
    assert verdict.expires_at == window.next_update < at + Policy().reattest_interval_s


def test_sgx_quote_is_refused_even_when_its_status_is_accepted() -> None:
    permissive = Policy(accepted_tcb_statuses=("UpToDate", "ConfigurationAndSWHardeningNeeded"))
    verdict = _verify("dcap-qvl-sgx", policy=permissive)
    assert verdict.checks["tcb_status_accepted"] is True
    assert verdict.checks["tee_type_tdx"] is False
    assert not verdict.ok


def test_out_of_date_status_is_refused_by_the_default_policy() -> None:
    # The SGX vector is the one real quote whose status is not UpToDate: the status check
    # must fail on its own, whatever the TEE type.
    verdict = _verify("dcap-qvl-sgx")
    assert verdict.checks["tcb_status_accepted"] is False


def test_refused_advisory() -> None:
    policy = Policy(
        accepted_tcb_statuses=("ConfigurationAndSWHardeningNeeded",),
        refused_advisory_ids=("INTEL-SA-00615",),
    )
    verdict = _verify("dcap-qvl-sgx", policy=policy)
    assert verdict.checks["advisories_accepted"] is False


def test_wrong_nonce_fails() -> None:
    name = "dcap-qvl-tdx-v4"
    report_data = dcap_qvl.parse_quote(quote_bytes(name)).report.report_data
    common = dict(
        policy=Policy(),
        collateral=collateral_text(name),
        now=vector(name)["at"],
        require_binding=False,
    )
    evidence = {"intel_quote": quote_bytes(name).hex()}
    right = verify_evidence(evidence, nonce=bytes(report_data[32:]), **common)
    assert right.ok and right.checks["report_data_nonce"] is True
    wrong = verify_evidence(evidence, nonce=bytes(32), **common)
    assert not wrong.ok
    assert wrong.reason == "attestation failed: report_data does not bind our nonce"


def test_without_collateral_nothing_is_verified() -> None:
    verdict = verify_evidence(
        {"intel_quote": quote_bytes("dcap-qvl-tdx-v4").hex()},
        nonce=None,
        policy=Policy(),
        collateral=None,
        now=vector("dcap-qvl-tdx-v4")["at"],
        require_binding=False,
    )
    assert not verdict.ok
    assert verdict.reason == "attestation failed: no collateral to verify the quote with"


def test_binding_is_required_unless_waived() -> None:
    name = "dcap-qvl-tdx-v4"
    verdict = verify_evidence(
        {"intel_quote": quote_bytes(name).hex()},
        nonce=None,
        policy=Policy(),
        collateral=collateral_text(name),
        now=vector(name)["at"],
    )
    assert not verdict.ok
    assert verdict.checks["report_data_nonce"] is False
    assert verdict.checks["report_data_signing_key"] is False
