"""Receipts: canonical JSON signed with the gateway's Ed25519 key; tampering fails."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path

import pytest

from teegate.catalog.attestation.receipts import (
    RECEIPT_VERSION,
    ReceiptError,
    canonical,
    load_or_create_key,
    public_hex,
    sign_receipt,
    verify_receipt,
)

BODY = {
    "version": RECEIPT_VERSION,
    "id": "rcpt_x",
    "revision": 1,
    "model": "m",
    "issued_at": 1700000000,
    "request_sha256": "ab" * 32,
    "response_sha256": "cd" * 32,
    "verdict": {
        "quote_sha256": "ef" * 32,
        "signing_address": "0x" + "12" * 20,
        "gpu": "unverified",
    },
    "upstream_signature": {"status": "pending"},
}


def test_canonical_is_sorted_and_compact() -> None:
    doc = {"b": 1, "a": [1, {"d": "é", "c": True}]}
    assert canonical(doc) == '{"a":[1,{"c":true,"d":"é"}],"b":1}'.encode()


def test_key_created_once_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "receipt-key.pem"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_hex(load_or_create_key(path)) == public_hex(key)
    os.chmod(path, 0o644)
    with pytest.raises(ReceiptError, match="readable by others"):
        load_or_create_key(path)


def test_sign_verify_and_tamper(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "k.pem")
    doc = sign_receipt(BODY, key)
    assert verify_receipt(doc, public_hex(key)) == BODY
    for path, value in [
        (("model",), "n"),
        (("response_sha256",), "ce" * 32),
        (("verdict", "gpu"), "verified"),
        (("upstream_signature", "status"), "verified"),
        (("revision",), 2),
    ]:
        bad = copy.deepcopy(doc)
        target = bad["receipt"]
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
        with pytest.raises(ReceiptError, match="altered"):
            verify_receipt(bad, public_hex(key))
    other = load_or_create_key(tmp_path / "other.pem")
    with pytest.raises(ReceiptError, match="another signing key"):
        verify_receipt(doc, public_hex(other))
    # Swapping in another key's name and signature does not pass against ours either.
    forged = sign_receipt(BODY, other)
    with pytest.raises(ReceiptError):
        verify_receipt(forged, public_hex(key))
