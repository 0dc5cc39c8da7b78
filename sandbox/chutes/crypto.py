"""The instance side of Chutes' end-to-end encryption: what runs inside the simulated enclave.

Why a separate implementation: the gateway seals requests with its own code
(``catalog/chutes/e2ee.py``); if the sandbox used that code to open them, a shared mistake
would pass unseen. This file follows the protocol as Chutes' instance library and its
published clients speak it, and the interop test runs the published ``chutes-e2ee`` client
against it.

Wire format (ML-KEM-768, HKDF-SHA256 with salt = the KEM ciphertext's first 16 bytes,
ChaCha20-Poly1305 with a random 12-byte nonce and no AAD):

- request: ``kem_ct(1088) ‖ nonce(12) ‖ ciphertext ‖ tag(16)``, info ``e2e-req-v1``,
  plaintext gzip(JSON) carrying ``e2e_response_pk`` (base64 ML-KEM-768 public key);
- plain response: the same layout, encapsulated to ``e2e_response_pk``, info ``e2e-resp-v1``,
  plaintext gzip(JSON);
- stream: ``{"e2e_init": b64(kem_ct)}`` keys the stream (info ``e2e-stream-v1``), then each
  frame is ``b64(nonce ‖ ciphertext ‖ tag)`` of one upstream SSE event, not compressed.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEM_CT_LEN = 1088
PUBLIC_KEY_LEN = 1184
NONCE_LEN = 12
TAG_LEN = 16
INFO_REQUEST = b"e2e-req-v1"
INFO_RESPONSE = b"e2e-resp-v1"
INFO_STREAM = b"e2e-stream-v1"
# A gzip bomb must not take the sandbox down: a chat request is far smaller than this.
MAX_PLAINTEXT = 64 * 1024 * 1024


class OpenError(Exception):
    """A request that this instance cannot open (wrong key, tampered, malformed)."""


def _derive(secret: bytes, kem_ct: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=kem_ct[:16], info=info).derive(secret)


def _seal(key: bytes, plaintext: bytes) -> bytes:
    nonce = os.urandom(NONCE_LEN)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, None)


def _gunzip(data: bytes) -> bytes:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        out = f.read(MAX_PLAINTEXT + 1)
    if len(out) > MAX_PLAINTEXT:
        raise OpenError("request too large")
    return out


@dataclass(frozen=True)
class Opened:
    """A decrypted request: the body (without ``e2e_response_pk``) and the key to answer to."""

    body: dict[str, Any]
    response_key: MLKEM768PublicKey


class InstanceKey:
    """One instance's ML-KEM-768 key pair; ``public_b64`` is what ``/e2e/instances`` lists."""

    def __init__(self) -> None:
        self._private = MLKEM768PrivateKey.generate()
        self.public_b64 = base64.b64encode(self._private.public_key().public_bytes_raw()).decode()

    def open_request(self, blob: bytes) -> Opened:
        if len(blob) < KEM_CT_LEN + NONCE_LEN + TAG_LEN:
            raise OpenError("request blob too short")
        kem_ct = blob[:KEM_CT_LEN]
        nonce = blob[KEM_CT_LEN : KEM_CT_LEN + NONCE_LEN]
        sealed = blob[KEM_CT_LEN + NONCE_LEN :]
        try:
            secret = self._private.decapsulate(kem_ct)
            key = _derive(secret, kem_ct, INFO_REQUEST)
            compressed = ChaCha20Poly1305(key).decrypt(nonce, sealed, None)
            body = json.loads(_gunzip(compressed))
        except (InvalidTag, ValueError, OSError, EOFError) as e:
            raise OpenError("E2E decryption failed") from e
        if not isinstance(body, dict):
            raise OpenError("E2E payload is not a JSON object")
        pk_b64 = body.pop("e2e_response_pk", None)
        try:
            raw = base64.b64decode(pk_b64, validate=True) if isinstance(pk_b64, str) else b""
            response_key = MLKEM768PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError) as e:
            raise OpenError("missing or malformed e2e_response_pk") from e
        return Opened(body, response_key)


def seal_response(response_key: MLKEM768PublicKey, plaintext: bytes) -> bytes:
    """A non-streamed answer: ``kem_ct ‖ nonce ‖ ciphertext ‖ tag`` of gzip(plaintext)."""
    secret, kem_ct = response_key.encapsulate()
    return kem_ct + _seal(_derive(secret, kem_ct, INFO_RESPONSE), gzip.compress(plaintext))


class StreamSealer:
    """Seals one stream: ``init_payload`` keys it, ``frame`` seals each upstream SSE event."""

    def __init__(self, response_key: MLKEM768PublicKey) -> None:
        secret, kem_ct = response_key.encapsulate()
        self._key = _derive(secret, kem_ct, INFO_STREAM)
        self.init_b64 = base64.b64encode(kem_ct).decode()

    def frame(self, plaintext: bytes) -> str:
        return base64.b64encode(_seal(self._key, plaintext)).decode()
