"""Certificate chains for GPU attestation: pinned root, each link signed, valid at a time.

Shared by the device chain (GPU leaf up to NVIDIA's Device Identity CA) and the RIM signing
chain (L4 signer up to NVIDIA's CoRIM signing root). The root is compared by the SHA-256 of
its DER, never by name: a forged chain can copy every name.

Signatures that verified are remembered by the SHA-256 of the certificate's and its issuer's
DER (bounded): whether given bytes are signed by a given key never changes, and a gateway
re-attesting many Chutes instances every few minutes sees the same GPU chains again and again
(each link's P-384 check costs milliseconds). Validity times are still checked every time.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

SIGNED_CACHE_MAX = 4096
_signed: set[tuple[bytes, bytes]] = set()
"""(sha256(cert DER), sha256(issuer DER)) pairs whose signature verified."""


class ChainError(ValueError):
    """The chain is not a valid path to the pinned root at the given time."""


def der_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def iso(unix_seconds: int) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_validity(cert: x509.Certificate, at: int, what: str) -> None:
    moment = datetime.fromtimestamp(at, UTC)
    if moment < cert.not_valid_before_utc:
        raise ChainError(f"{what} not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    if moment > cert.not_valid_after_utc:
        raise ChainError(f"{what} expired {cert.not_valid_after_utc:%Y-%m-%d}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _name(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else cert.subject.rfc4514_string()


def root_pinned(chain: list[x509.Certificate], root: x509.Certificate) -> bool:
    """Is the chain's last certificate byte-identical to ``root``?"""
    return bool(chain) and der_sha256(chain[-1]) == der_sha256(root)


def verify_chain(chain: list[x509.Certificate], at: int) -> None:
    """Each certificate issued and signed by the next, issuers CAs, all valid at ``at``;
    the last one (the already pinned root) signed by itself. Raises :class:`ChainError`."""
    for i, cert in enumerate(chain):
        issuer = chain[i + 1] if i + 1 < len(chain) else cert
        if i > 0 and not _is_ca(cert):
            raise ChainError(f"{_what(i, cert)} is not a CA but issues certificate {i - 1}")
        _signed_by(cert, issuer, i)
        moment = datetime.fromtimestamp(at, UTC)
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            check_validity(cert, at, _what(i, cert))  # raises, naming the certificate


def _what(i: int, cert: x509.Certificate) -> str:
    # Only on failure: reading names costs more than the cached signature check.
    return f"certificate {i} ({_name(cert)})"


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate, i: int) -> None:
    """``cert`` issued and signed by ``issuer`` (see the module docstring for the cache)."""
    pair = (
        hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest(),
        hashlib.sha256(issuer.public_bytes(serialization.Encoding.DER)).digest(),
    )
    if pair in _signed:
        return
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as e:
        detail = str(e) or 'bad signature'
        raise ChainError(
            f"{_what(i, cert)} is not signed by {_name(issuer)}: {detail}"
        ) from None
    if len(_signed) >= SIGNED_CACHE_MAX:
        _signed.clear()
    _signed.add(pair)
