"""The gateway's own attestation: a TDX quote binding its receipt key, when it runs in a TD.

Clients check receipts against the gateway's Ed25519 public key. Taken from the gateway's word
alone, that key proves only that the same party signed every receipt; bound into a TDX quote of
the TD the gateway runs in, it proves the receipts come from that measured code. The layout is
NEAR AI's, so the same verification applies (:mod:`.binding`)::

    report_data[0:32]  = the 32-byte Ed25519 public key
    report_data[32:64] = the client's 32-byte nonce (zeros in the quote made at start)

A quote provider is anything that turns 64 bytes of report_data into a quote. In a TD with a
Linux 6.7+ kernel that is configfs-tsm (:class:`TsmQuoteProvider`): make a report entry,
write ``inblob``, read ``outblob``. Tests use the test DCAP PKI
(:class:`teegate.sandbox.dcap_pki.DcapTestPki`) as the provider, and verify the quote with the
same verifier the gateway applies to upstreams.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from teegate.catalog.attestation.binding import binds_nonce, binds_signing_key

QuoteProvider = Callable[[bytes], bytes]


def gateway_report_data(public_key: bytes, nonce: bytes | None = None) -> bytes:
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    nonce = bytes(32) if nonce is None else nonce
    if len(nonce) != 32:
        raise ValueError("nonce must be 32 bytes")
    return public_key + nonce


def binds_gateway_key(report_data: bytes, public_key: bytes, nonce: bytes | None = None) -> bool:
    """Whether a quote's ``report_data`` binds this receipt key (and the nonce, when given)."""
    if not binds_signing_key(report_data, public_key):
        return False
    return nonce is None or binds_nonce(report_data, nonce)


class TsmQuoteProvider:
    """Quotes from the kernel's configfs-tsm interface (``/sys/kernel/config/tsm/report``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        entry = self.root / f"teegate-{secrets.token_hex(8)}"
        os.mkdir(entry)
        try:
            (entry / "inblob").write_bytes(report_data)
            quote = (entry / "outblob").read_bytes()
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(entry)
        if not quote:
            raise OSError(f"{self.root}: the TSM provider returned an empty quote")
        return quote
