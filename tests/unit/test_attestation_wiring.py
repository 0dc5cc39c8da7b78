"""The attestation addons and settings in-process (mitmproxy's taddons/tflow): fail closed
without a service, never let the upstream speak for attestation, Seal requires the stage,
and the ``[attestation]`` table reaches the addon intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow, tutils

from teegate import config
from teegate.addons import flowstate
from teegate.addons.attestation import NOT_RUNNING, AttestationSync
from teegate.addons.attestation_gate import AttestationGate, response_headers
from teegate.addons.attestation_report import parse_nonce
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.errors import GatewayError
from teegate.addons.flowstate import Route, Stage
from teegate.addons.seal import Seal
from teegate.catalog.attestation import Policy
from teegate.catalog.models import CatalogModel
from teegate.runner import REQUIRED_STAGES, build_addons

DEFAULTS = config.Settings()

TEE = "org/model-TEE"


def _sync(policy: Policy = DEFAULTS.attestation) -> AttestationSync:
    catalog = CatalogSync(DEFAULTS.catalog, DEFAULTS.upstream)
    return AttestationSync(policy, DEFAULTS.upstream, catalog)


def _chat_flow(approved_by: tuple[Stage, ...] = (Stage.GATE,)):
    req = tutils.treq(method=b"POST", path=b"/v1/chat/completions", content=b"{}")
    flow = tflow.tflow(req=req)
    flowstate.set_route(flow, Route.CHAT)
    flowstate.set_catalog_model(flow, CatalogModel.model_construct(id=TEE))
    for stage in approved_by:
        flowstate.passed(flow, stage)
    return flow


async def test_without_a_running_service_every_model_is_refused():
    sync = _sync()
    gate = AttestationGate(sync)
    flow = _chat_flow()
    with taddons.context(sync, gate):
        await gate.request(flow)
        response_headers(sync).response(flow)
    assert flow.response.status_code == 400
    body = json.loads(flow.response.content)["error"]
    assert body["code"] == "model_not_confidential" and NOT_RUNNING in body["message"]
    assert flow.response.headers["x-teegate-attestation-mode"] == "dcap"
    assert "x-teegate-quote-sha256" not in flow.response.headers


def test_upstream_attestation_headers_are_dropped_in_flag_mode():
    sync = _sync(Policy(mode="flag"))
    gate = AttestationGate(sync)
    flow = _chat_flow()
    flow.response = tutils.tresp(
        headers=[
            (b"x-teegate-quote-sha256", b"ab" * 32),
            (b"X-Teegate-Signing-Address", b"0xspoofed"),
            (b"x-teegate-attestation-mode", b"dcap"),
        ]
    )
    with taddons.context(sync, gate):
        response_headers(sync).responseheaders(flow)
    assert flow.response.headers["x-teegate-attestation-mode"] == "flag"
    assert "x-teegate-quote-sha256" not in flow.response.headers
    assert "x-teegate-signing-address" not in flow.response.headers


def test_seal_refuses_a_chat_the_attestation_stage_did_not_approve():
    assert Stage.ATTESTATION in REQUIRED_STAGES
    others = tuple(s for s in REQUIRED_STAGES if s != Stage.ATTESTATION)
    flow = _chat_flow(approved_by=others)
    Seal(REQUIRED_STAGES).request(flow)
    assert flow.response.status_code == 500
    approved = _chat_flow(approved_by=REQUIRED_STAGES)
    Seal(REQUIRED_STAGES).request(approved)
    assert approved.response is None


def test_the_attestation_table_reaches_the_addon_intact(tmp_path: Path):
    der = tmp_path / "root.der"
    der.write_bytes(_self_signed_der())
    (tmp_path / "proxy.toml").write_text(
        "[attestation]\n"
        'mode = "dcap"\n'
        'test_root_ca = "root.der"\n'
        "reattest_interval_s = 1\n"
        f'mrtd_allowlist = ["{"ab" * 48}"]\n'
    )
    settings = config.load(tmp_path / "proxy.toml")
    assert settings.attestation.test_root_ca == der.resolve()  # beside the file
    (sync,) = (a for a in build_addons(settings) if isinstance(a, AttestationSync))
    assert sync.policy == settings.attestation


def test_an_unknown_mode_stops_the_load(tmp_path: Path):
    (tmp_path / "proxy.toml").write_text('attestation.mode = "trust-me"\n')
    with pytest.raises(config.ConfigError, match=r"attestation\.mode"):
        config.load(tmp_path / "proxy.toml")


def test_defaults_are_dcap_under_intels_root():
    settings = config.load(None)
    assert settings.attestation.mode == "dcap" and settings.attestation.test_root_ca is None


@pytest.mark.parametrize("content", [None, b"not a certificate"])
def test_a_bad_test_root_stops_the_load(tmp_path: Path, content: bytes | None):
    if content is not None:
        (tmp_path / "root.der").write_bytes(content)
    (tmp_path / "proxy.toml").write_text('attestation.test_root_ca = "root.der"\n')
    with pytest.raises(config.ConfigError, match=r"attestation\.test_root_ca"):
        config.load(tmp_path / "proxy.toml")


@pytest.mark.parametrize("text", ["", "ab" * 31, "ab" * 33, "zz" * 32, " " + "ab" * 31 + "a"])
def test_bad_nonces(text: str):
    with pytest.raises(GatewayError) as exc:
        parse_nonce(text)
    assert exc.value.param == "nonce" and exc.value.code == "invalid_value"


def test_good_nonce():
    assert parse_nonce("AB" * 32) == b"\xab" * 32 and parse_nonce(None) is None


def _self_signed_der() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)
