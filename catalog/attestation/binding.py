"""How a quote's 64-byte ``report_data`` ties it to one request and one signing key.

NEAR AI / Phala layout: ``report_data[32:64]`` is the verifier's 32-byte nonce (freshness:
the quote was made for us, now), ``report_data[0:32]`` is the upstream's signing address
right-padded with zeros, or, when the upstream binds its TLS certificate too,
``sha256(address || TLS certificate fingerprint)``. The latter can only be checked by whoever
saw the certificate, so it is accepted only when the caller passes the fingerprint it saw.
"""

from __future__ import annotations

import hashlib

from Crypto.Hash import keccak


def ethereum_address(public_key: bytes) -> bytes:
    """The 20-byte Ethereum address of a secp256k1 public key (64-byte x||y, or 65 with 0x04)."""
    if len(public_key) == 65 and public_key[0] == 4:
        public_key = public_key[1:]
    if len(public_key) != 64:
        raise ValueError("public key must be 64 bytes x||y")
    return keccak.new(digest_bits=256, data=public_key).digest()[-20:]


def binds_nonce(report_data: bytes, nonce: bytes) -> bool:
    return len(report_data) == 64 and report_data[32:64] == nonce


def binds_signing_key(
    report_data: bytes, address: bytes, tls_fingerprint: bytes | None = None
) -> bool:
    """True when ``report_data[0:32]`` commits to ``address`` in one of the accepted ways."""
    if len(report_data) != 64 or not 0 < len(address) <= 32:
        return False
    head = report_data[:32]
    if head == address.ljust(32, b"\x00"):
        return True
    return (
        tls_fingerprint is not None and head == hashlib.sha256(address + tls_fingerprint).digest()
    )


def expected_report_data(address: bytes, nonce: bytes) -> bytes:
    """What an upstream without TLS binding should put in report_data."""
    if len(nonce) != 32 or not 0 < len(address) <= 32:
        raise ValueError("nonce must be 32 bytes and the address at most 32")
    return address.ljust(32, b"\x00") + nonce
