"""Revocation of GPU certificates from OCSP responses supplied ahead of time.

OCSP is online-only, so teegate never asks a responder itself: an operator (or a job) saves
DER ``OCSPResponse`` files into ``[attestation].gpu_ocsp_dir`` and each certificate that
NVIDIA's OCSP covers (device certificates 1-3: not the leaf, not the root) is matched to a
response by its CertID (serial, issuer name and key hashes), whatever the file is called.

A response counts only when it is successful, signed by the issuer or by a responder
certificate the issuer signed with the OCSPSigning EKU, and fresh at the verification time
(``this_update <= at <= next_update``). NVIDIA's responses carry no OCSP nonce, so freshness
rests on those times alone. Any certificate without such a response leaves the verdict's
revocation "unchecked"; a single "revoked" answer fails the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from teegate.catalog.attestation.gpu_chain import ChainError, check_validity

MAX_RESPONSES = 256
MAX_RESPONSE_BYTES = 64 * 1024


def load_responses(folder: Path) -> list[ocsp.OCSPResponse]:
    """Every readable DER OCSP response in ``folder`` (unreadable files are ignored: a
    certificate without a usable response stays "unchecked")."""
    found = []
    for path in sorted(folder.glob("*.der"))[:MAX_RESPONSES]:
        try:
            if path.stat().st_size <= MAX_RESPONSE_BYTES:
                found.append(ocsp.load_der_ocsp_response(path.read_bytes()))
        except (OSError, ValueError):
            continue
    return found


def _matches(resp: ocsp.OCSPResponse, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Does the response's CertID name ``cert`` as issued by ``issuer``?"""
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return False
    try:
        # The request builder computes CertID hashes exactly as RFC 6960 defines them.
        ours = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, resp.hash_algorithm)
        request = ours.build()
        return (
            resp.serial_number == cert.serial_number
            and resp.issuer_name_hash == request.issuer_name_hash
            and resp.issuer_key_hash == request.issuer_key_hash
        )
    except (ValueError, TypeError):  # e.g. several answers in one response: not NVIDIA's
        return False


def _signed_by(resp: ocsp.OCSPResponse, issuer: x509.Certificate, at: int) -> bool:
    candidates = [issuer]
    for responder in resp.certificates:
        try:
            responder.verify_directly_issued_by(issuer)
            eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            check_validity(responder, at, "OCSP responder")
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound, ChainError):
            continue
        if x509.ExtendedKeyUsageOID.OCSP_SIGNING in eku:
            candidates.append(responder)
    for signer in candidates:
        try:
            key = signer.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                continue
            algorithm = resp.signature_hash_algorithm
            if algorithm is None:
                continue
            key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(algorithm))
            return True
        except (InvalidSignature, TypeError, ValueError):
            continue
    return False


@dataclass
class ChainStatus:
    outcome: str = "good"
    unchecked: list[str] = field(default_factory=list)
    revoked: str = ""


def _fresh(resp: ocsp.OCSPResponse, at: int) -> bool:
    moment = datetime.fromtimestamp(at, UTC)
    this_update = resp.this_update_utc
    next_update = resp.next_update_utc
    return this_update <= moment and next_update is not None and moment <= next_update


def cert_status(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    responses: Iterable[ocsp.OCSPResponse],
    at: int,
) -> str:
    """"good", "revoked", or why it is unchecked ("no OCSP response", "... stale", ...).
    Among several usable answers for one certificate, "revoked" wins."""
    why = "no OCSP response"
    found: set[ocsp.OCSPCertStatus] = set()
    for resp in responses:
        if not _matches(resp, cert, issuer):
            continue
        if not _fresh(resp, at):
            why = "OCSP response stale"
            continue
        if not _signed_by(resp, issuer, at):
            why = "OCSP response not signed by the issuer or a responder valid then"
            continue
        found.add(resp.certificate_status)
    if ocsp.OCSPCertStatus.REVOKED in found:
        return "revoked"
    if ocsp.OCSPCertStatus.GOOD in found:
        return "good"
    return "OCSP status unknown" if found else why


def chain_status(
    chain: list[x509.Certificate],
    positions: Iterable[int],
    responses: list[ocsp.OCSPResponse],
    at: int,
) -> ChainStatus:
    """The revocation status of ``chain[i]`` for each ``i`` in ``positions``."""
    result = ChainStatus()
    for i in positions:
        status = cert_status(chain[i], chain[i + 1], responses, at)
        if status == "revoked":
            result.outcome = "revoked"
            result.revoked = f"certificate {i} is revoked"
            return result
        if status != "good":
            result.outcome = "unchecked"
            result.unchecked.append(f"gpu_revocation: certificate {i}: {status}")
    return result
