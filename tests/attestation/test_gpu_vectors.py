"""NVIDIA GPU evidence: the verifier gives exactly the outcomes in the vectors' manifest,
and refuses every derived negative (flipped signature, wrong nonce, foreign root, truncated
SPDM, duplicate GPU, certificates outside their validity at the given time)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography import x509

from teegate.catalog.attestation.gpu import (
    GpuRequirements,
    leaf_fwid,
    parse_gpu_payload,
    verify_gpu_payload,
)
from teegate.catalog.attestation.gpu_chain import ChainError, root_pinned, verify_chain
from teegate.catalog.attestation.gpu_ocsp import cert_status, load_responses
from teegate.catalog.attestation.gpu_rim import (
    RimError,
    _keyinfo_chain,
    check_measurements,
    load_rim,
    reported_versions,
)
from teegate.catalog.attestation.nvidia_roots import device_root
from teegate.catalog.attestation.spdm import SpdmError, parse_measurements
from tests.support.gpu_vectors import (
    GPU_VECTORS,
    VECTORS,
    expect,
    folder,
    item,
    payload,
    payload_file,
    raw_vector_payload,
)

V1, V2 = VECTORS["V1"], VECTORS["V2"]
V1_AT, V2_AT = V1["at"], V2["at"]
V1_NONCE = bytes.fromhex(V1["expected_nonce"])
V2_NONCE = bytes.fromhex(V2["expected_nonce"])
V1_EVIDENCE = (folder("V1") / "evidence.bin").read_bytes()
V1_CHAIN = (folder("V1") / "cert_chain.pem").read_bytes()
RIMS = folder("V1") / "rim"
OCSP = folder("V1") / "ocsp"


def _v1(**kw):
    return verify_gpu_payload(raw_vector_payload("V1"), nonce=V1_NONCE, at=V1_AT, **kw)


def _v2(raw=None, **kw):
    return verify_gpu_payload(raw or payload_file("V2"), nonce=V2_NONCE, at=V2_AT, **kw)


def _v2_items() -> list[dict]:
    return json.loads(payload_file("V2"))["evidence_list"]


# -- V1: NVIDIA's sample report, with RIMs and OCSP ----------------------------------------


def test_v1_chain_and_root() -> None:
    chain = x509.load_pem_x509_certificates(V1_CHAIN)
    assert len(chain) == expect("V1", "cert_count")
    assert root_pinned(chain, device_root()) is expect("V1", "root_pinned")
    verify_chain(chain, V1_AT)  # "chain": "ok"
    assert leaf_fwid(chain[0]).hex() == expect("V1", "fwid")


def test_a_remembered_signature_still_checks_validity_and_the_issuer() -> None:
    """Verified links are cached by DER hashes; times and other issuers are checked anew."""
    chain = x509.load_pem_x509_certificates(V1_CHAIN)
    verify_chain(chain, V1_AT)
    verify_chain(chain, V1_AT)  # from the cache
    with pytest.raises(ChainError, match="not valid before"):
        verify_chain(chain, 1_500_000_000)
    with pytest.raises(ChainError, match="is not signed by"):
        verify_chain([chain[0], *chain[2:]], V1_AT)


def test_v1_spdm_layout() -> None:
    m = parse_measurements(V1_EVIDENCE)
    layout = expect("V1", "spdm_layout")
    assert len(V1_EVIDENCE) == layout["total"]
    assert m.request_nonce == V1_EVIDENCE[slice(*layout["request_nonce"])]
    assert m.response_nonce == V1_EVIDENCE[slice(*layout["response_nonce"])]
    assert len(m.signed) == layout["signature"][0]
    assert len(m.blocks) == 64 and all(len(v) == 48 for v in m.blocks.values())
    assert m.request_nonce.hex() == expect("V1", "spdm_request_nonce")
    assert m.opaque[11].hex() == expect("V1", "nvdec0_status")
    versions = reported_versions(m)
    assert versions["driver_version"] == expect("V1", "driver_version")
    assert versions["vbios_version"] == expect("V1", "vbios_version")
    assert versions["rim_ids"] == expect("V1", "rim_ids")


def test_v1_verifies_with_its_own_nonce_rims_and_ocsp() -> None:
    v = _v1(requirements=GpuRequirements(rim_dir=RIMS, ocsp_dir=OCSP))
    assert v.ok, v.reason
    for name in ("gpu_chain", "gpu_spdm_parses", "gpu_spdm_signature", "gpu_nonce"):
        assert v.checks[name] is True
    assert v.checks["gpu_fwid_matches"] is expect("V1", "fwid_match")
    assert v.gpus[0].fwid == expect("V1", "fwid")
    assert v.measurements == "verified"
    assert v.checks["gpu_rim_signature"] and v.checks["gpu_rim_version"]
    assert v.checks["gpu_measurements_match"]
    assert "GPU 0: gpu_measurements: index 35 skipped (NVDEC0 not in use)" in v.skipped
    # Device-chain OCSP answers are stale at `at`: revocation is not claimed.
    assert v.revocation == "unchecked"


def test_v1_measurements_match_the_manifest() -> None:
    m = parse_measurements(V1_EVIDENCE)
    r = check_measurements(m, RIMS, V1_AT)
    want = expect("V1", "measurements")
    assert r.outcome == "verified" and r.mismatched == want["mismatched"]
    driver = load_rim((RIMS / "NV_GPU_DRIVER_GH100_550.90.07.xml").read_bytes(), V1_AT)
    vbios = load_rim((RIMS / "NV_GPU_VBIOS_1010_0200_882_96009F0001.xml").read_bytes(), V1_AT)
    assert len(driver.references) == want["driver_active"]
    assert len(vbios.references) == want["vbios_active"]
    assert len(driver.references) + len(vbios.references) == want["golden_active"]
    assert (driver.version, vbios.version) == ("550.90.07", "96.00.9F.00.01")
    assert any(str(i) in s for i in want["skipped_nvdec0"] for s in r.skipped)


def test_v1_canned_nonce_never_passes_as_fresh() -> None:
    fresh = bytes(range(32))
    v = verify_gpu_payload(raw_vector_payload("V1"), nonce=fresh, at=V1_AT)
    assert expect("V1", "nonce_matches_a_fresh_client_nonce") is False
    assert not v.ok and v.checks["gpu_nonce"] is False
    assert v.checks["gpu_spdm_signature"] is True


def test_v1_without_rims_or_ocsp_claims_neither() -> None:
    v = _v1()
    assert v.ok
    assert (v.measurements, v.revocation) == ("unverified", "unchecked")
    assert not any(k.startswith(("gpu_rim", "gpu_measurements")) for k in v.checks)


def test_v1_require_measurements_without_rims_refuses() -> None:
    v = _v1(requirements=GpuRequirements(require_measurements=True))
    assert not v.ok and "measurements unverified" in v.reason


def _rim_certs() -> dict[str, list[x509.Certificate]]:
    from lxml import etree

    return {
        kind: _keyinfo_chain(etree.fromstring((RIMS / f"{rim_id}.xml").read_bytes()))
        for kind, rim_id in expect("V1", "rim_ids").items()
    }


def _ocsp_subjects() -> dict[str, tuple[x509.Certificate, x509.Certificate]]:
    chain = x509.load_pem_x509_certificates(V1_CHAIN)
    rims = _rim_certs()
    return {
        "ocsp/gpu-chain-1-gsp-brom.der": (chain[1], chain[2]),
        "ocsp/gpu-chain-2-provisioner-ica.der": (chain[2], chain[3]),
        "ocsp/gpu-chain-3-gh100-identity.der": (chain[3], chain[4]),
        "ocsp/rim-driver-0-l4-signer.der": (rims["driver"][0], rims["driver"][1]),
        "ocsp/rim-vbios-0-l4-signer.der": (rims["vbios"][0], rims["vbios"][1]),
        "ocsp/rim-1-reference-value-l3.der": (rims["driver"][1], rims["driver"][2]),
        "ocsp/rim-2-reference-value-ca.der": (rims["driver"][2], rims["driver"][3]),
    }


@pytest.mark.parametrize("when", ["ocsp_at_at", "ocsp_at_gpu_ocsp"])
def test_v1_ocsp_statuses_match_the_manifest(when: str) -> None:
    at = V1["at"] if when == "ocsp_at_at" else V1["at_gpu_ocsp"]
    subjects = _ocsp_subjects()
    for name, want in expect("V1", when).items():
        cert, issuer = subjects[name]
        response = load_responses(GPU_VECTORS / V1["dir"] / "ocsp")
        status = cert_status(cert, issuer, response, at)
        assert status == ("good" if want == "good" else "OCSP response stale"), name


def test_v1_ocsp_only_for_its_own_certificate() -> None:
    chain = x509.load_pem_x509_certificates(V1_CHAIN)
    # The BROM's response says nothing about the Provisioner ICA.
    only = [r for r in load_responses(OCSP) if r.serial_number == chain[1].serial_number]
    assert cert_status(chain[2], chain[3], only, V1["at_gpu_ocsp"]) == "no OCSP response"


def test_v1_revocation_good_when_every_device_answer_is_fresh() -> None:
    v = verify_gpu_payload(
        raw_vector_payload("V1"),
        nonce=V1_NONCE,
        at=V1["at_gpu_ocsp"],
        requirements=GpuRequirements(ocsp_dir=OCSP, require_revocation=True),
    )
    assert v.ok, v.reason
    assert v.revocation == "good" and v.checks["gpu_not_revoked"]


@pytest.mark.parametrize("at_key", ["rim_chain_at_1771804800", "rim_chain_at_1795797111"])
def test_v1_rim_chains_expire_as_the_manifest_says(at_key: str) -> None:
    at = int(at_key.rsplit("_", 1)[1])
    for kind, rim_id in expect("V1", "rim_ids").items():
        want = expect("V1", at_key)[kind]
        data = (RIMS / f"{rim_id}.xml").read_bytes()
        if want == "ok":
            load_rim(data, at)
        else:
            with pytest.raises(RimError, match="expired"):
                load_rim(data, at)


def test_v1_expired_rim_signer_fails_the_measurements() -> None:
    v = verify_gpu_payload(
        raw_vector_payload("V1"),
        nonce=V1_NONCE,
        at=1795797111,
        requirements=GpuRequirements(rim_dir=RIMS),
    )
    assert not v.ok and v.measurements == "failed"
    assert v.checks["gpu_rim_signature"] is False and "expired" in v.reason


def test_tampered_rim_fails_its_signature(tmp_path) -> None:
    for f in RIMS.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = tmp_path / "NV_GPU_DRIVER_GH100_550.90.07.xml"
    path.write_bytes(path.read_bytes().replace(b"80161aac5e75", b"80161aac5e76"))
    v = _v1(requirements=GpuRequirements(rim_dir=tmp_path))
    assert not v.ok and v.measurements == "failed" and v.checks["gpu_rim_signature"] is False


def test_missing_rim_leaves_measurements_unverified(tmp_path) -> None:
    (tmp_path / "NV_GPU_DRIVER_GH100_550.90.07.xml").write_bytes(
        (RIMS / "NV_GPU_DRIVER_GH100_550.90.07.xml").read_bytes()
    )
    v = _v1(requirements=GpuRequirements(rim_dir=tmp_path))
    assert v.ok and v.measurements == "unverified"
    assert any("no RIM NV_GPU_VBIOS" in s for s in v.skipped)


# -- V2: eight real H100s with a real nonce ----------------------------------------------


def test_v2_eight_gpus_verify() -> None:
    v = _v2(requirements=GpuRequirements(expected_count=expect("V2", "gpu_count")))
    assert v.ok, v.reason
    assert v.gpu_count == 8 and v.checks["gpu_distinct"] is expect("V2", "unique_leaf_serials")
    assert (v.measurements, v.revocation) == (expect("V2", "measurements"), "unchecked")
    assert expect("V2", "ocsp") == "unchecked"
    for gpu in v.gpus:
        assert gpu.spdm_nonce == expect("V2", "spdm_request_nonce")
        assert gpu.fwid == expect("V2", "fwid")
        assert gpu.driver_version == expect("V2", "driver_version")
        assert gpu.vbios_version == expect("V2", "vbios_version")
        assert gpu.rim_ids == expect("V2", "rim_ids")
        assert all(gpu.checks.values()) and len(gpu.checks) == 7


def test_v2_list_shape_verifies_too() -> None:
    raw = (folder("V2") / "gpu_evidence.json").read_text()
    assert parse_gpu_payload(raw).nonce == V2["expected_nonce"]
    assert _v2(raw).ok


def test_v2_wrong_count_refused() -> None:
    v = _v2(requirements=GpuRequirements(expected_count=7))
    assert not v.ok and v.reason.endswith("8 GPUs reported, policy expects 7")


def test_v2_not_yet_valid_certificates_refused() -> None:
    # V2's device certificates are valid from 2022-03-01.
    v = verify_gpu_payload(payload_file("V2"), nonce=V2_NONCE, at=1_600_000_000)
    assert not v.ok and v.checks["gpu_chain"] is False and "not valid before" in v.reason


def test_v2_duplicate_gpu_refused() -> None:
    items = _v2_items()
    v = _v2(payload([items[0], items[1], items[0]], V2["expected_nonce"]))
    assert not v.ok and v.checks["gpu_distinct"] is False
    assert v.reason == "GPU evidence rejected: the same GPU is reported twice"


def test_v2_wrong_nonce_refused() -> None:
    v = verify_gpu_payload(payload_file("V2"), nonce=bytes(32), at=V2_AT)
    assert not v.ok and v.checks["gpu_nonce"] is False


def test_no_nonce_never_passes() -> None:
    v = verify_gpu_payload(payload_file("V2"), nonce=None, at=V2_AT)
    assert not v.ok and "no nonce" in v.reason


def test_non_hopper_refused() -> None:
    items = [dict(i, arch="BLACKWELL") for i in _v2_items()]
    v = _v2(payload(items, V2["expected_nonce"], arch="BLACKWELL"))
    assert not v.ok and v.checks["gpu_arch_hopper"] is False


def test_empty_payload_refused() -> None:
    v = _v2(payload([], V2["expected_nonce"]))
    assert not v.ok and v.checks["gpu_count"] is False


@pytest.mark.parametrize("raw", ["not json", "[1]", '{"evidence_list": {}}', "42"])
def test_malformed_payload_refused(raw: str) -> None:
    v = verify_gpu_payload(raw, nonce=V2_NONCE, at=V2_AT)
    assert not v.ok and v.checks == {"gpu_payload_well_formed": False}


# -- derived negatives -------------------------------------------------------------------


def test_n1_flipped_signature_byte() -> None:
    n1 = VECTORS["N1"]
    v = verify_gpu_payload(raw_vector_payload("N1"), nonce=V1_NONCE, at=n1["at"])
    assert v.checks["gpu_chain"] is (expect("N1", "chain") == "ok")
    assert v.checks["gpu_spdm_parses"] is (expect("N1", "spdm_parse") == "ok")
    assert v.checks["gpu_spdm_signature"] is False and expect("N1", "spdm_signature") == "fail"
    assert not v.ok and expect("N1", "verdict") == "reject"
    # Unsigned measurements are never compared with (let alone said to match) the RIMs.
    v = verify_gpu_payload(
        raw_vector_payload("N1"), nonce=V1_NONCE, at=n1["at"],
        requirements=GpuRequirements(rim_dir=RIMS),
    )  # fmt: skip
    assert not v.ok and v.measurements == "unverified"


@pytest.mark.parametrize("offset", [0, 40, 100, 3600, 4116])
def test_any_flipped_evidence_byte_fails(offset: int) -> None:
    ev = bytearray(V1_EVIDENCE)
    ev[offset] ^= 0x01
    v = verify_gpu_payload(raw_vector_payload("V1", bytes(ev)), nonce=V1_NONCE, at=V1_AT)
    assert not v.ok


def test_n2_canned_evidence_with_fresh_payload_nonce() -> None:
    n2 = VECTORS["N2"]
    nonce = bytes.fromhex(n2["expected_nonce"])
    v = verify_gpu_payload(payload_file("N2"), nonce=nonce, at=n2["at"])
    assert v.checks["gpu_payload_nonce"] is expect("N2", "payload_nonce_matches_expected")
    assert v.checks["gpu_chain"] and v.checks["gpu_spdm_signature"]
    assert v.gpus[0].spdm_nonce == expect("N2", "spdm_request_nonce")
    assert v.checks["gpu_nonce"] is expect("N2", "nonce_matches_expected")
    assert not v.ok and "not ours" in v.reason


def test_n3_foreign_root() -> None:
    n3 = VECTORS["N3"]
    v = verify_gpu_payload(
        payload_file("N3"), nonce=bytes.fromhex(n3["expected_nonce"]), at=n3["at"]
    )
    assert v.checks["gpu_root_pinned"] is expect("N3", "root_pinned")
    assert not v.ok and "pinned NVIDIA Device Identity CA" in v.reason
    pem = base64.b64decode(json.loads(payload_file("N3"))["evidence_list"][0]["certificate"])
    chain = x509.load_pem_x509_certificates(pem)
    foreign = x509.load_pem_x509_certificate((folder("N3") / "foreign_root.pem").read_bytes())
    assert chain[-1] == foreign
    verify_chain(chain, n3["at"])  # self-consistent: only the pin catches it
    with pytest.raises(ChainError):  # and a name-matched swap to NVIDIA's root fails too
        verify_chain([*chain[:-1], device_root()], n3["at"])


def test_n3_passes_only_against_its_own_root_as_test_root() -> None:
    n3 = VECTORS["N3"]
    foreign = x509.load_pem_x509_certificate((folder("N3") / "foreign_root.pem").read_bytes())
    v = verify_gpu_payload(
        payload_file("N3"),
        nonce=bytes.fromhex(n3["expected_nonce"]),
        at=n3["at"],
        requirements=GpuRequirements(test_root=foreign),
    )
    assert v.ok and v.root == "test" and v.checks["gpu_spdm_signature"]


@pytest.mark.parametrize(
    "evidence",
    [
        V1_EVIDENCE[:-1],
        V1_EVIDENCE + b"\x00",
        V1_EVIDENCE[:36],
        V1_EVIDENCE[:3000],
        V1_EVIDENCE[:4021],
        b"",
    ],
    ids=["one-short", "one-long", "request-only", "mid-record", "no-signature", "empty"],
)
def test_truncated_or_padded_spdm_refused(evidence: bytes) -> None:
    with pytest.raises(SpdmError):
        parse_measurements(evidence)
    v = verify_gpu_payload(raw_vector_payload("V1", evidence), nonce=V1_NONCE, at=V1_AT)
    assert not v.ok
    # Empty evidence is already refused as a malformed payload.
    assert v.checks.get("gpu_spdm_parses", v.checks["gpu_payload_well_formed"]) is False


def test_spdm_rejects_a_request_without_signature() -> None:
    ev = bytearray(V1_EVIDENCE)
    ev[2] &= 0xFE
    with pytest.raises(SpdmError, match="signature"):
        parse_measurements(bytes(ev))


def test_chain_of_four_refused() -> None:
    chain = x509.load_pem_x509_certificates(V1_CHAIN)
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = b"".join(c.public_bytes(Encoding.PEM) for c in chain[1:])
    v = verify_gpu_payload(
        payload([item(pem, V1_EVIDENCE)], V1["expected_nonce"]), nonce=V1_NONCE, at=V1_AT
    )
    assert not v.ok and v.checks["gpu_cert_count"] is False
