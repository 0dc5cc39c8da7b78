"""Collateral fetched over HTTP by dcap-qvl's own client, from a PCCS serving the test PKI.

The PCCS here is a small aiohttp app answering the four PCCS v4 endpoints dcap-qvl asks for,
with collateral signed under the test root: the real fetch path, end to end.
"""

from __future__ import annotations

import os
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from aiohttp import test_utils, web

from teegate.catalog.attestation import AttestationService, CollateralCache, Policy, parse_near_ai
from teegate.sandbox.dcap_pki import DcapTestPki, TdMeasurements
from teegate.sandbox.evidence import EvidenceMinter
from tests.support.gpu_vectors import trusting_sandbox_gpus
from tests.support.tdx_vectors import NOW

VALID_FOR = 3600


class PccsApp:
    def __init__(self, pki: DcapTestPki) -> None:
        self.c = pki.collateral(issue=NOW - 100, next_update=NOW + VALID_FOR)
        self.hits: Counter[str] = Counter()

    def _chain(self, name: str) -> str:
        return urllib.parse.quote(self.c[name])

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.hits[path] += 1
        c = self.c
        if path == "/sgx/certification/v4/pckcrl":
            headers = {"SGX-PCK-CRL-Issuer-Chain": self._chain("pck_crl_issuer_chain")}
            return web.Response(body=bytes.fromhex(c["pck_crl"]), headers=headers)
        if path == "/sgx/certification/v4/rootcacrl":
            return web.Response(text=c["root_ca_crl"])
        if path == "/tdx/certification/v4/tcb":
            body = f'{{"tcbInfo":{c["tcb_info"]},"signature":"{c["tcb_info_signature"]}"}}'
            headers = {"TCB-Info-Issuer-Chain": self._chain("tcb_info_issuer_chain")}
            return web.Response(text=body, headers=headers)
        if path == "/tdx/certification/v4/qe/identity":
            body = (
                f'{{"enclaveIdentity":{c["qe_identity"]},'
                f'"signature":"{c["qe_identity_signature"]}"}}'
            )
            headers = {"SGX-Enclave-Identity-Issuer-Chain": self._chain("qe_identity_issuer_chain")}
            return web.Response(text=body, headers=headers)
        return web.Response(status=404)


@pytest.fixture
async def pccs(pki: DcapTestPki) -> AsyncIterator[tuple[str, PccsApp]]:
    state = PccsApp(pki)
    app = web.Application()
    app.router.add_get("/{tail:.*}", state.handle)
    server = test_utils.TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), state
    finally:
        await server.close()


async def test_fetched_collateral_verifies_and_is_cached(
    pki: DcapTestPki, pccs: tuple[str, PccsApp]
) -> None:
    url, state = pccs
    cache = CollateralCache(url)  # dcap_qvl.get_collateral does the HTTP
    quote = pki.td_quote(bytes(64), TdMeasurements(mrtd=bytes(48), rtmrs=(bytes(48),) * 4))
    collateral = await cache.get(quote, NOW)
    assert dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_ca_der, NOW).status == (
        "UpToDate"
    )
    first = sum(state.hits.values())
    assert first >= 4
    await cache.get(quote, NOW + VALID_FOR - 1)
    assert sum(state.hits.values()) == first
    await cache.get(quote, NOW + VALID_FOR + 1)
    assert sum(state.hits.values()) == 2 * first


class NoShippedCollateral:
    """Evidence as a real upstream sends it: without the sandbox's extra collateral field."""

    name = "no-collateral"

    def __init__(self, minter: EvidenceMinter) -> None:
        self.minter = minter

    async def fetch(self, model: str, nonce: bytes) -> dict[str, Any]:
        evidence = self.minter.report(model, nonce)
        del evidence["collateral"]
        return evidence

    def parse(self, evidence: dict[str, Any]) -> list:
        return parse_near_ai(evidence)


async def test_service_fetches_from_pccs_when_no_collateral_is_shipped(
    pki: DcapTestPki, pccs: tuple[str, PccsApp], root_der_file: Path
) -> None:
    url, state = pccs
    source = NoShippedCollateral(EvidenceMinter(pki, clock=lambda: NOW))
    policy = trusting_sandbox_gpus(Policy(test_root_ca=root_der_file, pccs_url=url))
    service = AttestationService(source, policy, clock=lambda: NOW)
    verdict = await service.attest_now("org/m-TEE", os.urandom(32))
    assert verdict.ok, verdict.reason
    assert state.hits["/tdx/certification/v4/tcb"] == 1
    assert verdict.expires_at == NOW + policy.reattest_interval_s + policy.verdict_grace_s
