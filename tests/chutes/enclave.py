"""A test-side Chutes instance, written from the protocol notes: opens what the gateway seals
and seals answers the way an instance does, so the gateway's relay can be driven in unit tests
without a sandbox process."""

from __future__ import annotations

import base64
import gzip
import json
import os
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def _key(secret: bytes, kem_ct: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=kem_ct[:16], info=info).derive(secret)


class Enclave:
    def __init__(self) -> None:
        self.key = MLKEM768PrivateKey.generate()
        self.pubkey_b64 = base64.b64encode(self.key.public_key().public_bytes_raw()).decode()

    def open_request(self, payload: bytes) -> dict[str, Any]:
        kem_ct, nonce, sealed = payload[:1088], payload[1088:1100], payload[1100:]
        key = _key(self.key.decapsulate(kem_ct), kem_ct, b"e2e-req-v1")
        return json.loads(gzip.decompress(ChaCha20Poly1305(key).decrypt(nonce, sealed, None)))

    @staticmethod
    def seal_response(body: dict[str, Any], response_pk_b64: str) -> bytes:
        pk = MLKEM768PublicKey.from_public_bytes(base64.b64decode(response_pk_b64))
        secret, kem_ct = pk.encapsulate()
        nonce = os.urandom(12)
        plain = gzip.compress(json.dumps(body).encode())
        aead = ChaCha20Poly1305(_key(secret, kem_ct, b"e2e-resp-v1"))
        return kem_ct + nonce + aead.encrypt(nonce, plain, None)

    @staticmethod
    def stream(
        chunks: list[dict[str, Any]], response_pk_b64: str, usage: dict[str, Any] | None = None
    ) -> list[str]:
        """The SSE data payloads an instance (and the relay) send for ``chunks``."""
        pk = MLKEM768PublicKey.from_public_bytes(base64.b64decode(response_pk_b64))
        secret, kem_ct = pk.encapsulate()
        aead = ChaCha20Poly1305(_key(secret, kem_ct, b"e2e-stream-v1"))

        def frame(line: str) -> str:
            nonce = os.urandom(12)
            raw = nonce + aead.encrypt(nonce, line.encode(), None)
            return json.dumps({"e2e": base64.b64encode(raw).decode()})

        out = [json.dumps({"e2e_init": base64.b64encode(kem_ct).decode()})]
        out += [frame(f"data: {json.dumps(c)}\n\n") for c in chunks]
        if usage is not None:
            out.append(json.dumps({"usage": usage}))  # the relay's plaintext copy
        out.append(frame("data: [DONE]\n\n"))
        out.append("[DONE]")
        return out
