"""Chutes per-instance evidence: quotes minted by the test DCAP PKI over the Chutes binding.

Each instance is verified on its own; only a quote binding our nonce, exactly the key
``/e2e/instances`` gave, and the instance certificate's SPKI makes an instance usable, and
only with GPU evidence (test GPU hierarchy) signed over that same binding digest.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.x509.oid import NameOID

from teegate.catalog.attestation import Policy
from teegate.catalog.attestation.chutes import (
    key_binding_digest,
    model_verdict,
    parse_evidence,
    parse_instances,
    verify_instances,
)
from teegate.catalog.attestation.evidence import EvidenceError
from teegate.catalog.attestation.gpu import GpuVerdict
from teegate.sandbox.dcap_pki import (
    DEFAULT_TD_ATTRIBUTES,
    TD_ATTR_DEBUG,
    DcapTestPki,
    TdMeasurements,
)
from teegate.sandbox.gpu_evidence import GpuTestPki
from tests.support.gpu_vectors import trusting_sandbox_gpus
from tests.support.tdx_vectors import NOW

GPUS = GpuTestPki()

MODEL = "test/chute-TEE"
MRTD = hashlib.sha384(b"chutes td").digest()
RTMRS = tuple(hashlib.sha384(bytes([i])).digest() for i in range(4))


def _cert() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "instance")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2024, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2024, 1, 1, tzinfo=UTC) + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _spki(der: bytes) -> bytes:
    pub = x509.load_der_x509_certificate(der).public_key()
    return hashlib.sha256(
        pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).digest()


def _key() -> str:
    return base64.b64encode(MLKEM768PrivateKey.generate().public_key().public_bytes_raw()).decode()


@dataclass(frozen=True)
class Case:
    """How one instance's evidence is minted (each field: one way to get it wrong)."""

    bind_key: str | None = None  # None: the instance's own key
    bind_nonce: str | None = None  # None: our nonce
    bind_cert: bytes | None = None  # None: the instance's own certificate
    debug: bool = False
    mrtd: bytes = MRTD
    failed: bool = False
    no_evidence: bool = False
    gpu: str = "bound"  # "bound" (to the binding digest), "raw_nonce" (ours), "none"


def _mint(pki: DcapTestPki, nonce_hex: str, cases: dict[str, Case]) -> tuple[dict, dict[str, str]]:
    keys, rows, failed = {}, [], []
    for iid, case in cases.items():
        key, cert = _key(), _cert()
        keys[iid] = key
        if case.failed:
            failed.append(iid)
        if case.no_evidence:
            continue
        report_data = key_binding_digest(
            case.bind_nonce or nonce_hex, case.bind_key or key
        ) + _spki(case.bind_cert or cert)
        m = TdMeasurements(
            mrtd=case.mrtd,
            rtmrs=RTMRS,  # type: ignore[arg-type]
            td_attributes=DEFAULT_TD_ATTRIBUTES | (TD_ATTR_DEBUG if case.debug else 0),
        )
        gpu_nonce = report_data[:32] if case.gpu == "bound" else bytes.fromhex(nonce_hex)
        rows.append(
            {
                "quote": base64.b64encode(pki.td_quote(report_data, m)).decode(),
                "gpu_evidence": None if case.gpu == "none" else GPUS.items(gpu_nonce),
                "instance_id": iid,
                "certificate": base64.b64encode(cert).decode(),
            }
        )
    return {"evidence": rows, "failed_instance_ids": failed}, keys


@pytest.fixture(scope="module")
def collateral(pki: DcapTestPki) -> dict[str, str]:
    return pki.collateral(issue=NOW - 86400, next_update=NOW + 30 * 86400)


def _verify(pki, collateral, doc, keys, nonce_hex, policy=None):
    return verify_instances(
        MODEL,
        keys,
        parse_evidence(doc),
        nonce_hex=nonce_hex,
        policy=trusting_sandbox_gpus(policy or Policy(mrtd_allowlist=(MRTD.hex(),))),
        collateral=lambda _q: collateral,
        now=NOW,
        root_ca_der=pki.root_ca_der,
    )


def test_good_instance_verifies(pki: DcapTestPki, collateral: dict[str, str]) -> None:
    nonce = secrets.token_hex(32)
    doc, keys = _mint(pki, nonce, {"i1": Case()})
    [v] = _verify(pki, collateral, doc, keys, nonce)
    assert v.ok, v.reason
    assert v.e2e_pubkey == keys["i1"]
    assert v.key_sha256 == hashlib.sha256(keys["i1"].encode()).hexdigest()
    assert v.checks["report_data_nonce_and_key"] and v.checks["report_data_certificate"]
    assert v.checks["mrtd_allowed"] and v.checks["quote_verified"]
    assert isinstance(v.gpu, GpuVerdict) and v.gpu.ok and v.gpu.gpu_count == 2
    assert v.gpu.checks["gpu_nonce"] and v.checks["gpu_evidence_verified"]
    assert "gpus" not in v.summary()["gpu"]
    assert v.usable(NOW, keys["i1"]) and not v.usable(NOW, _key())
    verdict = model_verdict(MODEL, [v], now=NOW, root="test", retry_s=60)
    assert verdict.ok and verdict.evidence_kind == "chutes"
    assert verdict.gpu == v.gpu
    assert "e2e_pubkey" not in verdict.summary()["instances"][0]


OTHER_NONCE = "00" * 32
WRONG: dict[str, tuple[Case, str]] = {
    "unbound_key": (Case(bind_key="A" * 1580 + "=="), "report_data_nonce_and_key"),
    "wrong_nonce": (Case(bind_nonce=OTHER_NONCE), "report_data_nonce_and_key"),
    "wrong_certificate": (Case(bind_cert=_cert()), "report_data_certificate"),
    "debug_td": (Case(debug=True), "not_debug"),
    "mrtd_not_allowed": (Case(mrtd=hashlib.sha384(b"rogue").digest()), "mrtd_allowed"),
    # GPUs signed over our raw nonce, not the digest the quote binds: not this instance's.
    "gpu_raw_nonce": (Case(gpu="raw_nonce"), "gpu_evidence_verified"),
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_bad_instance_is_refused_alone(
    name: str, pki: DcapTestPki, collateral: dict[str, str]
) -> None:
    case, check = WRONG[name]
    nonce = secrets.token_hex(32)
    doc, keys = _mint(pki, nonce, {"good": Case(), "bad": case})
    by_id = {v.instance_id: v for v in _verify(pki, collateral, doc, keys, nonce)}
    assert by_id["good"].ok, by_id["good"].reason
    assert not by_id["bad"].ok
    assert by_id["bad"].checks[check] is False, by_id["bad"].checks
    assert by_id["bad"].reason.startswith("attestation failed: ")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        (Case(failed=True), "upstream lists the instance as failed"),
        (Case(no_evidence=True), "no TEE evidence for the instance"),
    ],
)
def test_failed_or_missing_evidence_is_refused(
    case: Case, reason: str, pki: DcapTestPki, collateral: dict[str, str]
) -> None:
    nonce = secrets.token_hex(32)
    doc, keys = _mint(pki, nonce, {"x": case})
    [v] = _verify(pki, collateral, doc, keys, nonce)
    assert not v.ok and reason in v.reason
    verdict = model_verdict(MODEL, [v], now=NOW, root="test", retry_s=60)
    assert not verdict.ok and "no attested instance" in verdict.reason


def test_key_given_as_decoded_bytes_does_not_bind(
    pki: DcapTestPki, collateral: dict[str, str]
) -> None:
    """The digest is over the strings; binding the raw key bytes must not pass."""
    nonce = secrets.token_hex(32)
    doc, keys = _mint(pki, nonce, {"i": Case()})
    [v] = _verify(pki, collateral, doc, {"i": keys["i"] + "\n"}, nonce)
    assert not v.ok


def test_rtmr3_allow_list_applies(pki: DcapTestPki, collateral: dict[str, str]) -> None:
    nonce = secrets.token_hex(32)
    doc, keys = _mint(pki, nonce, {"i": Case()})
    pinned = Policy(mrtd_allowlist=(MRTD.hex(),), rtmr3_allowlist=(RTMRS[3].hex(),))
    assert _verify(pki, collateral, doc, keys, nonce, pinned)[0].ok
    other = Policy(mrtd_allowlist=(MRTD.hex(),), rtmr3_allowlist=("00" * 48,))
    [v] = _verify(pki, collateral, doc, keys, nonce, other)
    assert not v.ok and v.checks["rtmr3_allowed"] is False


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"evidence": "x"},
        {"evidence": [{"instance_id": "i", "quote": "!!", "certificate": "AA=="}]},
        {"evidence": [{"instance_id": "i", "quote": "AA==", "certificate": 3}]},
    ],
)
def test_malformed_evidence_raises(doc: Any) -> None:
    with pytest.raises(EvidenceError):
        parse_evidence(doc)


def test_instances_parse_and_cap_token_lifetime() -> None:
    d = parse_instances(
        {
            "instances": [{"instance_id": "i", "e2e_pubkey": "k", "nonces": ["a", "b"]}],
            "nonce_expires_in": 3600,
        }
    )
    assert d.instances[0].nonces == ("a", "b") and d.nonce_expires_in == 60
    with pytest.raises(EvidenceError):
        parse_instances({"instances": [{"instance_id": "i"}]})


@pytest.mark.parametrize(("gpu_evidence", "usable"), [("verify", True), ("require", False)])
def test_an_instance_without_gpu_evidence_follows_the_policy(
    gpu_evidence: str, usable: bool, pki: DcapTestPki, collateral: dict[str, str]
) -> None:
    nonce = secrets.token_hex(32)
    doc, keys = _mint(pki, nonce, {"g": Case(), "cpu_only": Case(gpu="none")})
    policy = Policy(mrtd_allowlist=(MRTD.hex(),), gpu_evidence=gpu_evidence)
    by_id = {v.instance_id: v for v in _verify(pki, collateral, doc, keys, nonce, policy)}
    assert by_id["g"].ok, by_id["g"].reason
    assert by_id["cpu_only"].gpu == "absent" and by_id["cpu_only"].ok is usable
    if not usable:
        assert "no GPU evidence, and policy requires it" in by_id["cpu_only"].reason


def test_gpu_evidence_from_another_instance_does_not_verify(
    pki: DcapTestPki, collateral: dict[str, str]
) -> None:
    """Each instance's GPUs are bound to its own key: swapping GPU reports is caught."""
    nonce = secrets.token_hex(32)
    doc, keys = _mint(pki, nonce, {"a": Case(), "b": Case()})
    a, b = doc["evidence"]
    a["gpu_evidence"], b["gpu_evidence"] = b["gpu_evidence"], a["gpu_evidence"]
    verdicts = _verify(pki, collateral, doc, keys, nonce)
    assert not any(v.ok for v in verdicts)
    assert all("the signed SPDM" in v.reason for v in verdicts), [v.reason for v in verdicts]
