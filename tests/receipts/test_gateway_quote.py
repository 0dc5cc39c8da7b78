"""The gateway's own quote binds its receipt key (minted here with the test DCAP PKI, as a TD's
configfs-tsm provider would make it), and verifies like any upstream's."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import dcap_qvl
import pytest

from teegate.addons.attestation import AttestationSync
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.receipts import Receipts
from teegate.catalog.attestation import Policy
from teegate.catalog.attestation.gateway_quote import (
    TsmQuoteProvider,
    binds_gateway_key,
    gateway_report_data,
)
from teegate.config import ReceiptSettings, SignatureSettings, UpstreamSettings
from teegate.sandbox.dcap_pki import DcapTestPki, TdMeasurements
from tests.support.tdx_vectors import NOW

MEASURED = TdMeasurements(
    mrtd=hashlib.sha384(b"teegate gateway TD").digest(), rtmrs=(bytes(48),) * 4
)


def _verify(pki: DcapTestPki, quote: bytes) -> bytes:
    collateral = dcap_qvl.QuoteCollateralV3.from_json(
        json.dumps(pki.collateral(issue=NOW - 10, next_update=NOW + 10))
    )
    report = dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_ca_der, NOW)
    assert report.status == "UpToDate"
    parsed = dcap_qvl.parse_quote(quote)
    assert parsed.report.mr_td == MEASURED.mrtd
    return parsed.report.report_data


async def test_gateway_endpoint_serves_a_quote_binding_its_key(tmp_path: Path) -> None:
    pki = DcapTestPki()
    made: list[bytes] = []

    def provider(report_data: bytes) -> bytes:
        made.append(report_data)
        return pki.td_quote(report_data, MEASURED)

    upstream = UpstreamSettings(api_key="k")
    att = AttestationSync(Policy(), upstream, catalog=None)  # type: ignore[arg-type]
    settings = ReceiptSettings(key_path=tmp_path / "key.pem")
    receipts = Receipts(settings, SignatureSettings(check=False), upstream, att, LedgerLink(),
                        quote_provider=provider)  # fmt: skip
    await receipts.running()
    try:
        doc = await receipts._gateway(None)
        pub = bytes.fromhex(doc["public_key"])
        data = _verify(pki, bytes.fromhex(doc["quote"]))
        assert data == gateway_report_data(pub) and binds_gateway_key(data, pub)
        nonce = os.urandom(32)
        fresh = await receipts._gateway(nonce)
        data = _verify(pki, bytes.fromhex(fresh["quote"]))
        assert binds_gateway_key(data, pub, nonce) and fresh["nonce"] == nonce.hex()
        assert not binds_gateway_key(data, pub, os.urandom(32))
        assert not binds_gateway_key(data, os.urandom(32), nonce)  # another key
        assert len(made) == 2
    finally:
        await receipts.done()


def test_tsm_provider_writes_inblob_and_reads_outblob(tmp_path: Path, monkeypatch) -> None:
    """configfs-tsm's protocol, against a directory standing in for the kernel's."""
    real_mkdir = os.mkdir

    def mkdir(path: os.PathLike[str], *args: object) -> None:
        real_mkdir(path)
        Path(path, "outblob").write_bytes(b"QUOTE")  # what the kernel would make

    monkeypatch.setattr(os, "mkdir", mkdir)
    provider = TsmQuoteProvider(tmp_path)
    monkeypatch.setattr(os, "rmdir", lambda p: None)
    assert provider(bytes(64)) == b"QUOTE"
    [entry] = list(tmp_path.iterdir())
    assert (entry / "inblob").read_bytes() == bytes(64)
    with pytest.raises(ValueError):
        provider(bytes(32))
