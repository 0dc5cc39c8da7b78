"""Receipts: what the gateway signs for each served chat, so a client need not take its word.

A receipt names hashes only, never content: the SHA-256 of the request body the gateway sent
upstream and of the response bytes it received from the upstream (what the upstream's own
signature covers), of the bytes it relayed to the client, the model, the time, the verdict
it relied on (quote SHA-256, signing address, GPU result, policy hash) and, once checked, the
upstream's signature and its status. The document is signed with the gateway's own Ed25519
key over its canonical JSON (sorted keys, no spaces, UTF-8)::

    {"receipt": {...}, "signature": {"alg": "ed25519", "public_key": hex, "value": hex}}

A receipt is issued when the chat ends with ``upstream_signature.status = "pending"`` and
re-issued (same id, ``revision`` + 1, signed again) when the upstream's signature has been
checked: the later revision supersedes the earlier one; both verify. ``outcome`` says whether
the client got the answer whole (``complete``) or a stream was cut (``incomplete``: no
``response_sha256``, only the hashes of what was relayed and received up to the cut, and why);
fields are only ever added within a version, so a verifier ignores the ones it does not know.

The gateway's key is generated on first start (PKCS#8 PEM, file mode 0600, created
exclusively so two starts cannot race) and its public key served at
``GET /v1/attestation/gateway``; inside a TD, also bound into the gateway's own TDX quote
(:mod:`teegate.catalog.attestation.gateway_quote`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

RECEIPT_VERSION = "teegate.receipt.v1"


class ReceiptError(ValueError):
    """A receipt or key that cannot be used."""


def canonical(doc: Any) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, UTF-8 (RFC 8785-like for the
    strings, integers and booleans receipts hold; receipts hold no floats)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The gateway's signing key at ``path``, generated there (0600) on first use.

    A key file others may read is refused: anyone who can read it can forge receipts."""
    path = path.expanduser()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load_key(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return key


def _load_key(path: Path) -> Ed25519PrivateKey:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ReceiptError(
            f"{path}: the receipt key is readable by others (mode {oct(mode & 0o777)}); "
            "chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as e:
        raise ReceiptError(f"{path}: not a PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ReceiptError(f"{path}: not an Ed25519 key")
    return key


class ReceiptSigner:
    """Signs receipt bodies with the gateway's key.

    A receipt is serialized once: the canonical bytes of its body are what is signed, and the
    stored document is built around those same bytes (``{"receipt":<body>,"signature":<sig>}``
    with keys sorted is exactly that concatenation), so issuing costs one ``json.dumps``, not three.
    """

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.public_key = public_hex(key)

    def sign(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """(the signed document, its canonical JSON text)."""
        raw = canonical(body)
        sig = {"alg": "ed25519", "public_key": self.public_key, "value": self.key.sign(raw).hex()}
        text = '{"receipt":' + raw.decode() + ',"signature":' + canonical(sig).decode() + "}"
        return {"receipt": body, "signature": sig}, text


def sign_receipt(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    return ReceiptSigner(key).sign(body)[0]


def verify_receipt(doc: Any, public_key: str) -> dict[str, Any]:
    """The receipt body when ``doc`` is signed by ``public_key`` (hex); else ReceiptError."""
    if not isinstance(doc, dict):
        raise ReceiptError("a receipt is a JSON object")
    body, sig = doc.get("receipt"), doc.get("signature")
    if not isinstance(body, dict) or not isinstance(sig, dict):
        raise ReceiptError("a receipt has 'receipt' and 'signature' objects")
    if body.get("version") != RECEIPT_VERSION:
        raise ReceiptError(f"unknown receipt version {str(body.get('version'))[:40]!r}")
    if sig.get("alg") != "ed25519":
        raise ReceiptError("only Ed25519 receipts are known")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key.removeprefix("0x")))
        value = bytes.fromhex(str(sig.get("value")))
    except ValueError as e:
        raise ReceiptError("public key or signature is not valid hex of the right size") from e
    if str(sig.get("public_key", "")).lower() != public_hex(key):
        raise ReceiptError("the receipt names another signing key than the one given")
    try:
        key.verify(value, canonical(body))
    except InvalidSignature as e:
        raise ReceiptError("signature does not verify: the receipt was altered") from e
    return body
