"""Without ``attestation.test_root_ca``, the gateway pins Intel's root: test-PKI quotes fail.

The gateway here runs with the defaults ``teegate run`` uses, except that its PCCS is a local
one serving the sandbox's own (test-signed, current) collateral. Everything a test-root
gateway needs is thus within reach, and still no model is served: the quotes do not chain
to Intel's root.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from tests.support.gateway_proc import REPO_ROOT, GatewayProc, start_gateway
from tests.support.reattest import MSG
from tests.support.sandbox_proc import SandboxProc

TEE = "deepseek-ai/DeepSeek-V3.2-TEE"


def _pccs_handler(c: dict[str, str]) -> type[BaseHTTPRequestHandler]:
    """The four PCCS v4 endpoints dcap-qvl asks for, answering with collateral ``c``."""

    def chain(name: str) -> str:
        return urllib.parse.quote(c[name])

    routes: dict[str, tuple[bytes, dict[str, str]]] = {
        "/sgx/certification/v4/pckcrl": (
            bytes.fromhex(c["pck_crl"]),
            {"SGX-PCK-CRL-Issuer-Chain": chain("pck_crl_issuer_chain")},
        ),
        "/sgx/certification/v4/rootcacrl": (c["root_ca_crl"].encode(), {}),
        "/tdx/certification/v4/tcb": (
            f'{{"tcbInfo":{c["tcb_info"]},"signature":"{c["tcb_info_signature"]}"}}'.encode(),
            {"TCB-Info-Issuer-Chain": chain("tcb_info_issuer_chain")},
        ),
        "/tdx/certification/v4/qe/identity": (
            f'{{"enclaveIdentity":{c["qe_identity"]},'
            f'"signature":"{c["qe_identity_signature"]}"}}'.encode(),
            {"SGX-Enclave-Identity-Issuer-Chain": chain("qe_identity_issuer_chain")},
        ),
    }

    class Handler(BaseHTTPRequestHandler):
        hits: list[str] = []

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            Handler.hits.append(path)
            body, headers = routes.get(path, (b"", {}))
            self.send_response(200 if path in routes else 404)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def pccs(upstream: SandboxProc) -> Iterator[tuple[str, type[BaseHTTPRequestHandler]]]:
    with upstream.client() as c:
        params = {"model": TEE, "nonce": secrets.token_hex(32), "signing_algo": "ecdsa"}
        collateral = c.get("/attestation/report", params=params).json()["collateral"]
    handler = _pccs_handler(collateral)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc, pccs) -> Iterator[GatewayProc]:
    url, _ = pccs
    extra = f'catalog.refresh_interval_s = 1\nattestation.pccs_url = "{url}"\n'
    with start_gateway(upstream.base_url, extra_toml=extra, attestation="defaults") as gw:
        yield gw


def test_test_pki_quotes_are_refused_under_intels_root(client: openai.OpenAI, http, pccs):
    _, handler = pccs
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=TEE, messages=MSG)
    assert exc.value.body["code"] == "model_not_confidential"
    message = exc.value.body["message"]
    assert "attestation failed: quote verification failed" in message, message
    assert "/tdx/certification/v4/tcb" in handler.hits  # the collateral was there to use
    assert http.get("/v1/models").json()["data"] == []
    rep = http.get("/v1/attestation/report", params={"model": TEE}).json()
    assert rep["verified"] is False and rep["verdict"]["root"] == "intel"
    assert rep["verdict"]["checks"]["quote_verified"] is False


def test_no_test_root_warning_without_the_setting(gateway: GatewayProc):
    assert "test_root_ca" not in gateway.log_text()
    assert "attestation_test_root_in_use" not in gateway.log_text()


def test_a_missing_test_root_file_stops_the_start(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('upstream.api_key = "k"\nattestation.test_root_ca = "nope.der"\n')
    done = subprocess.run(
        [sys.executable, "-m", "teegate", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert done.returncode == 2
    assert "attestation.test_root_ca" in done.stderr and str(tmp_path / "nope.der") in done.stderr
