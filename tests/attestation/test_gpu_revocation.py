"""Revocation and reference-value rules on evidence this test controls: OCSP answers signed
by the test GPU hierarchy (good, revoked, stale, forged), and RIM comparison rules."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from teegate.catalog.attestation.gpu import GpuRequirements, verify_gpu_payload
from teegate.catalog.attestation.gpu_rim import Reference, Rim, RimResult, _compare
from teegate.catalog.attestation.spdm import parse_measurements
from teegate.sandbox.gpu_evidence import GpuTestPki

NOW = 1_760_000_000
DAY = 86_400


@pytest.fixture(scope="module")
def pki() -> GpuTestPki:
    return GpuTestPki()


def _answer(
    pki: GpuTestPki,
    gpu: int,
    position: int,
    status: ocsp.OCSPCertStatus,
    *,
    this_update: int = NOW - 3600,
    forged: bool = False,
) -> bytes:
    chain = pki.issued(gpu)
    cert, (issuer, issuer_key) = chain[position][0], chain[position + 1]
    revoked = status == ocsp.OCSPCertStatus.REVOKED
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=issuer,
            algorithm=hashes.SHA384(),
            cert_status=status,
            this_update=datetime.fromtimestamp(this_update, UTC),
            next_update=datetime.fromtimestamp(this_update + DAY, UTC),
            revocation_time=datetime.fromtimestamp(NOW - DAY, UTC) if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        )
    )
    if forged:  # a look-alike of the issuer, with a key of its own
        issuer_key = ec.generate_private_key(ec.SECP384R1())
        issuer = (
            x509.CertificateBuilder(issuer.subject, issuer.subject, issuer_key.public_key())
            .serial_number(issuer.serial_number)
            .not_valid_before(issuer.not_valid_before_utc)
            .not_valid_after(issuer.not_valid_after_utc)
            .sign(issuer_key, hashes.SHA384())
        )
        builder = builder.certificates([issuer])
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
    return builder.sign(issuer_key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


def _write_all(pki: GpuTestPki, folder: Path, **overrides: bytes) -> Path:
    """One answer per certificate 1-3 (the GPUs share them: only leaves differ)."""
    for position in (1, 2, 3):
        name = f"cert-{position}.der"
        folder.joinpath(name).write_bytes(
            overrides.get(name) or _answer(pki, 0, position, ocsp.OCSPCertStatus.GOOD)
        )
    return folder


def _verify(pki: GpuTestPki, ocsp_dir: Path, **kw):
    nonce = os.urandom(32)
    root = x509.load_pem_x509_certificate(pki.root_pem)
    req = GpuRequirements(test_root=root, ocsp_dir=ocsp_dir, **kw)
    return verify_gpu_payload(pki.payload(nonce), nonce=nonce, at=NOW, requirements=req)


def test_fresh_good_answers_for_every_certificate(pki, tmp_path) -> None:
    v = _verify(pki, _write_all(pki, tmp_path), require_revocation=True)
    assert v.ok, v.reason
    assert v.revocation == "good" and all(g.revocation == "good" for g in v.gpus)


def test_a_revoked_certificate_refuses(pki, tmp_path) -> None:
    folder = _write_all(pki, tmp_path)
    # A good answer beside it does not outvote it.
    folder.joinpath("z-revoked.der").write_bytes(_answer(pki, 1, 2, ocsp.OCSPCertStatus.REVOKED))
    v = _verify(pki, folder)
    assert not v.ok and v.revocation == "revoked" and v.checks["gpu_not_revoked"] is False
    assert v.reason == "GPU evidence rejected: GPU 0 device: certificate 2 is revoked"


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ({"this_update": NOW - 2 * DAY}, "OCSP response stale"),
        ({"this_update": NOW + 3600}, "OCSP response stale"),
        ({"forged": True}, "not signed by the issuer"),
    ],
    ids=["expired", "not-yet-valid", "forged"],
)
def test_unusable_answers_leave_revocation_unchecked(pki, tmp_path, override, why) -> None:
    bad = _answer(pki, 0, 1, ocsp.OCSPCertStatus.GOOD, **override)
    folder = _write_all(pki, tmp_path, **{"cert-1.der": bad})
    v = _verify(pki, folder)
    assert v.ok and v.revocation == "unchecked"
    assert any(why in s and "certificate 1" in s for s in v.skipped), v.skipped
    strict = _verify(pki, folder, require_revocation=True)
    assert not strict.ok and "revocation unchecked" in strict.reason


def test_missing_answers_leave_revocation_unchecked(pki, tmp_path) -> None:
    v = _verify(pki, tmp_path)
    assert v.ok and v.revocation == "unchecked"
    assert any("no OCSP response" in s for s in v.skipped)


# -- reference-value rules (RIM content, after its signature was checked) ---------------


def _rim(refs: dict[int, Reference]) -> Rim:
    return Rim(version="x", references=refs)


def _measurements(pki: GpuTestPki):
    return parse_measurements(pki.spdm(0, bytes(32)))


def test_every_active_index_must_match_one_alternative(pki) -> None:
    m = _measurements(pki)
    ok = RimResult()
    driver = _rim({0: Reference(48, frozenset({b"x" * 48, m.blocks[1]}))})
    _compare(ok, m, driver, _rim({1: Reference(48, frozenset({m.blocks[2]}))}))
    assert ok.checks == {"gpu_rim_disjoint": True, "gpu_measurements_match": True}
    bad = RimResult()
    _compare(bad, m, driver, _rim({1: Reference(48, frozenset({b"y" * 48}))}))
    assert bad.mismatched == [1] and bad.checks["gpu_measurements_match"] is False
    absent = RimResult()
    _compare(absent, m, driver, _rim({40: Reference(48, frozenset({b"y" * 48}))}))
    assert absent.mismatched == [40]
    wrong_size = RimResult()
    _compare(wrong_size, m, driver, _rim({1: Reference(32, frozenset({m.blocks[2][:32]}))}))
    assert wrong_size.mismatched == [1]


def test_no_index_active_in_both_rims(pki) -> None:
    m = _measurements(pki)
    ref = {0: Reference(48, frozenset({m.blocks[1]}))}
    r = RimResult()
    _compare(r, m, _rim(ref), _rim(ref))
    assert r.checks["gpu_rim_disjoint"] is False


def test_index_35_skipped_only_when_nvdec0_is_off(pki) -> None:
    m = _measurements(pki)
    assert m.opaque[11] == b"\x55"
    ref = {35: Reference(48, frozenset({b"z" * 48}))}
    r = RimResult()
    _compare(r, m, _rim({}), _rim(ref))
    assert r.mismatched == [] and any("index 35 skipped" in s for s in r.skipped)
    on = type(m)(**{**m.__dict__, "opaque": {**m.opaque, 11: b"\x00"}})
    r = RimResult()
    _compare(r, on, _rim({}), _rim(ref))
    assert r.mismatched == [35]
