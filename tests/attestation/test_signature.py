"""Response signatures (NEAR AI / Phala): only our exact bytes, signed by the attested key."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from teegate.catalog.attestation.receipts import public_hex
from teegate.catalog.attestation.signature import (
    SignatureError,
    UpstreamSignature,
    recover_address,
    sha256_hex,
    verify_signature,
)
from teegate.sandbox.evidence import SigningKey
from teegate.sandbox.signatures import eip191_sign

REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
RESPONSE = b"data: {}\n\ndata: [DONE]\n\n"
REQ, RESP = sha256_hex(REQUEST), sha256_hex(RESPONSE)
KEY = SigningKey.generate()
OTHER = SigningKey.generate()


def _sig(text: str, key: SigningKey = KEY, address: str | None = None) -> UpstreamSignature:
    return UpstreamSignature(
        text=text,
        signature=eip191_sign(key, text),
        signing_address=address or key.address_hex,
        signing_algo="ecdsa",
    )


def _check(sig: UpstreamSignature, attested=(KEY.address_hex,), model: str | None = "m"):
    return verify_signature(
        sig, request_sha256=REQ, response_sha256=RESP, model=model, attested=attested
    )


def test_recovers_the_signers_address() -> None:
    text = f"{REQ}:{RESP}"
    assert recover_address(text, eip191_sign(KEY, text)) == KEY.address.hex()


@pytest.mark.parametrize("text", [f"{REQ}:{RESP}", f"m:{REQ}:{RESP}"])
def test_both_text_forms_verify(text: str) -> None:
    check = _check(_sig(text))
    assert check.ok, check.reason
    assert check.signer == KEY.address.hex()


def test_address_compared_case_insensitively() -> None:
    assert _check(_sig(f"{REQ}:{RESP}"), attested=(KEY.address_hex.upper(),)).ok


def test_flipped_signature_byte_fails() -> None:
    sig = _sig(f"{REQ}:{RESP}")
    raw = bytearray(bytes.fromhex(sig.signature[2:]))
    raw[5] ^= 0x01
    bad = UpstreamSignature(sig.text, "0x" + raw.hex(), sig.signing_address, "ecdsa")
    check = _check(bad)
    assert not check.ok  # recovers another key (or none)


def test_wrong_address_fails() -> None:
    check = _check(_sig(f"{REQ}:{RESP}", key=OTHER))
    assert not check.ok and "does not vouch" in check.reason
    # Claiming the attested address does not help: the recovered signer decides.
    check = _check(_sig(f"{REQ}:{RESP}", key=OTHER, address=KEY.address_hex))
    assert not check.ok and "does not vouch" in check.reason


@pytest.mark.parametrize(
    "text",
    [
        f"{RESP}:{REQ}",  # swapped
        f"{REQ}:{sha256_hex(RESPONSE + b' ')}",  # another response
        f"{sha256_hex(REQUEST.replace(b',', b', '))}:{RESP}",  # a re-serialized request
        f"other-model:{REQ}:{RESP}",  # another model's form
        f"{REQ.upper()}:{RESP.upper()}",  # not lowercase hex
        f"0x{REQ}:0x{RESP}",
        hashlib.sha256(f"{REQ}:{RESP}".encode()).hexdigest(),
    ],
)
def test_wrong_hash_forms_fail(text: str) -> None:
    check = _check(_sig(text))
    assert not check.ok and "does not match" in check.reason


def test_model_form_needs_the_model() -> None:
    assert not _check(_sig(f"m:{REQ}:{RESP}"), model=None).ok


def test_malformed_signatures_fail_closed() -> None:
    text = f"{REQ}:{RESP}"
    bad_v = eip191_sign(KEY, text)[:-2] + "1d"
    for signature in ("0xzz", "0x" + "00" * 65, "0x" + "11" * 64, bad_v):
        assert not _check(UpstreamSignature(text, signature, KEY.address_hex, "ecdsa")).ok
    with pytest.raises(SignatureError):
        UpstreamSignature.parse({"text": text, "signature": 1, "signing_address": "0x"})
    with pytest.raises(SignatureError):
        UpstreamSignature.parse({"text": text, "signature": "0x", "signing_address": "0x",
                                 "signing_algo": "rsa"})  # fmt: skip


def test_ed25519() -> None:
    key = Ed25519PrivateKey.generate()
    text = f"{REQ}:{RESP}"
    pub = public_hex(key)
    sig = UpstreamSignature(text, key.sign(text.encode()).hex(), pub, "ed25519")
    assert _check(sig, attested=(pub,)).ok
    assert not _check(sig, attested=(KEY.address_hex,)).ok
    flipped = f"{int(sig.signature[:2], 16) ^ 0xFF:02x}" + sig.signature[2:]  # always differs
    tampered = UpstreamSignature(text, flipped, pub, "ed25519")
    assert not _check(tampered, attested=(pub,)).ok
