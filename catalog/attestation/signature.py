"""Response signatures of NEAR AI / Phala upstreams: does this answer come from the attested key?

A verdict says which key a verified TD holds (the quote's ``report_data`` binds its address).
After each chat, the upstream serves ``GET /v1/signature/{chat_id}?model=...&signing_algo=...``:
``{text, signature, signing_address, signing_algo}``, where ``text`` commits to the exact bytes
of the request it received and of the response it sent:

* ``<sha256(request)>:<sha256(response)>`` (vllm-proxy, NEAR's gateway), or
* ``<model>:<sha256(request)>:<sha256(response)>`` (inference-proxy), lowercase hex.

Both forms are accepted, and nothing else: a text that does not name *our* hashes proves
nothing about our answer, however well it is signed.

ECDSA is Ethereum's ``personal_sign`` (EIP-191): keccak256 of ``"\\x19Ethereum Signed
Message:\\n" + len(text) + text`` on secp256k1, signature ``0x r||s||v`` (v 27/28, or 0/1); the
signer's address is recovered (coincurve, libsecp256k1) and must be one the verdict's quote
bound. Ed25519: a plain signature over the UTF-8 text by the 32-byte key the verdict bound.
The ``signing_address`` the upstream *claims* is never the authority: only the attested set is.

Pure functions, no I/O: the gateway's background checker and ``teegate attest signature`` both
use them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import coincurve
from Crypto.Hash import keccak
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from teegate.catalog.attestation.binding import ethereum_address

SignatureStatus = Literal["verified", "missing", "failed", "unchecked"]
"""What a usage row and a receipt record: ``unchecked`` when the gateway could not check
(its own queue was full, or the upstream kind serves no signatures), never the upstream's fault."""

MAX_TEXT = 1024


class SignatureError(ValueError):
    """A signature document that cannot be read."""


@dataclass(frozen=True, slots=True)
class UpstreamSignature:
    """The upstream's answer at ``/v1/signature/{chat_id}``."""

    text: str
    signature: str
    signing_address: str
    signing_algo: Literal["ecdsa", "ed25519"]

    @classmethod
    def parse(cls, doc: Any) -> UpstreamSignature:
        if not isinstance(doc, dict):
            raise SignatureError("signature document must be a JSON object")
        fields = {}
        for name in ("text", "signature", "signing_address"):
            value = doc.get(name)
            if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
                raise SignatureError(f"signature document: {name} must be a non-empty string")
            fields[name] = value
        algo = str(doc.get("signing_algo") or "ecdsa").lower()
        if algo not in ("ecdsa", "ed25519"):
            raise SignatureError(f"unsupported signing_algo {algo[:20]!r}")
        return cls(signing_algo=algo, **fields)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, str]:
        return {
            "text": self.text,
            "signature": self.signature,
            "signing_address": self.signing_address,
            "signing_algo": self.signing_algo,
        }


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    ok: bool
    reason: str
    signer: str | None = None
    """The address (ECDSA, recovered) or public key (Ed25519) that signed, lowercase hex
    without ``0x``, when the signature itself was readable."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_texts(request_sha256: str, response_sha256: str, model: str | None) -> set[str]:
    """Every text form an upstream signs for these bytes."""
    texts = {f"{request_sha256}:{response_sha256}"}
    if model:
        texts.add(f"{model}:{request_sha256}:{response_sha256}")
    return texts


def eip191_digest(text: str) -> bytes:
    data = text.encode()
    prefix = b"\x19Ethereum Signed Message:\n" + str(len(data)).encode()
    return keccak.new(digest_bits=256, data=prefix + data).digest()


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.removeprefix("0x").removeprefix("0X"))


def _norm(address: str) -> str:
    return address.lower().removeprefix("0x")


def recover_address(text: str, signature: str) -> str:
    """The Ethereum address (lowercase hex, no ``0x``) that EIP-191-signed ``text``."""
    try:
        sig = _hex(signature)
    except ValueError as e:
        raise SignatureError("signature is not hex") from e
    if len(sig) != 65:
        raise SignatureError("an ECDSA signature is 65 bytes r||s||v")
    v = sig[64]
    recid = v - 27 if v >= 27 else v
    if recid not in (0, 1):
        raise SignatureError("v must be 27 or 28 (or 0 or 1)")
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            sig[:64] + bytes([recid]), eip191_digest(text), hasher=None
        )
    except Exception as e:  # libsecp256k1 refuses points off the curve, r or s out of range
        raise SignatureError("no public key recovers from this signature") from e
    return ethereum_address(key.format(compressed=False)).hex()


def _ed25519_signer(text: str, signature: str, public_key: str) -> str:
    try:
        key = _hex(public_key)
        sig = _hex(signature)
    except ValueError as e:
        raise SignatureError("Ed25519 key or signature is not hex") from e
    if len(key) != 32 or len(sig) != 64:
        raise SignatureError("Ed25519 needs a 32-byte key and a 64-byte signature")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, text.encode())
    except InvalidSignature as e:
        raise SignatureError("Ed25519 signature does not verify") from e
    return key.hex()


def verify_signature(
    sig: UpstreamSignature,
    *,
    request_sha256: str,
    response_sha256: str,
    model: str | None,
    attested: Iterable[str],
) -> SignatureCheck:
    """Whether ``sig`` proves that a key in ``attested`` answered exactly these bytes."""
    allowed = {_norm(a) for a in attested if a}
    if sig.text not in expected_texts(request_sha256, response_sha256, model):
        return SignatureCheck(False, "signed text does not match the request and response hashes")
    try:
        if sig.signing_algo == "ecdsa":
            signer = recover_address(sig.text, sig.signature)
        else:
            signer = _ed25519_signer(sig.text, sig.signature, sig.signing_address)
    except SignatureError as e:
        return SignatureCheck(False, f"signature invalid: {e}")
    if signer not in allowed:
        return SignatureCheck(False, "signed by a key the attestation does not vouch for", signer)
    if _norm(sig.signing_address) != signer:
        return SignatureCheck(False, "signing_address differs from the key that signed", signer)
    return SignatureCheck(True, "signed by the attested key", signer)
