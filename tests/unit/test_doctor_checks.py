"""``teegate doctor``'s checks, one by one: temporary files, fake environments, fake transports."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teegate.config import Settings
from teegate.doctor import client, gateway, trust
from teegate.doctor.report import Check, Status, exit_status, render_json, render_text
from teegate.egress.ca import ca_cert_path

ROW = {
    "id": "m/TEE",
    "confidential_compute": True,
    "context_length": 1000,
    "pricing": {"prompt": "1", "completion": "2"},
}


def _pem(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pems() -> tuple[bytes, bytes]:
    return _pem("teegate egress CA"), _pem("some public root")


@pytest.fixture
def ca(tmp_path: Path, pems) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(pems[0])
    return path


@pytest.fixture
def with_ca(tmp_path: Path, pems) -> Path:
    """A bundle holding a public root and the CA (as `cat certifi ca.pem` makes)."""
    path = tmp_path / "bundle.pem"
    path.write_bytes(pems[1] + pems[0])
    return path


@pytest.fixture
def without_ca(tmp_path: Path, pems) -> Path:
    path = tmp_path / "certifi.pem"
    path.write_bytes(pems[1])
    return path


def _settings(**sections) -> Settings:
    return Settings.model_validate(sections)


def _which(*installed: str):
    return lambda name: f"/usr/bin/{name}" if name in installed else None


# -- the report ---------------------------------------------------------------------------------


def test_only_a_failure_fails_and_the_fix_is_printed():
    warn = Check("a", Status.WARN, "so-so", "do x")
    fail = Check("b", Status.FAIL, "broken", "do y\nthen z")
    assert exit_status([warn, Check("c", Status.SKIP, "n/a")]) == 0
    assert exit_status([warn, fail]) == 1
    text = render_text([warn, fail])
    assert "[FAIL] b: broken" in text and "fix: do y" in text and "then z" in text
    doc = json.loads(render_json([warn, fail]))
    assert doc["ok"] is False and doc["checks"][1] == {
        "name": "b",
        "status": "fail",
        "detail": "broken",
        "fix": "do y\nthen z",
    }


def test_a_check_this_machine_does_not_need_only_warns():
    fail = Check("b", Status.FAIL, "broken", "fix")
    assert fail.softened(required=False).status is Status.WARN
    assert fail.softened(required=True).status is Status.FAIL


# -- configuration ------------------------------------------------------------------------------


def test_configuration(tmp_path: Path):
    good = tmp_path / "good.toml"
    good.write_text("[catalog]\nrefresh_interval_s = 5\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[catalog]\nrefresh_intervall_s = 5\n")
    ok, settings = gateway.load_config(good)
    assert ok.status is Status.OK and settings is not None
    failed, none = gateway.load_config(bad)
    assert failed.status is Status.FAIL and none is None
    assert "catalog.refresh_intervall_s: unknown key" in failed.detail and failed.fix
    missing, _ = gateway.load_config(tmp_path / "nope.toml")
    assert missing.status is Status.FAIL
    defaults, _ = gateway.load_config(None)
    assert defaults.status is Status.WARN


# -- the upstream -------------------------------------------------------------------------------


def _upstream(handler) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def test_the_catalog_is_fetched_with_the_upstream_key():
    seen = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers["authorization"]
        return httpx.Response(
            200, json={"data": [ROW, {**ROW, "id": "m/plain", "confidential_compute": False}]}
        )

    ticks = iter([10.0, 10.25])
    check, ids = gateway.upstream_catalog(
        _settings(),
        {"TEEGATE_UPSTREAM_KEY": "up"},
        transport=_upstream(answer),
        clock=lambda: next(ticks),
    )
    assert check.status is Status.OK, check
    assert "1 confidential, 1 other model(s), in 250 ms" in check.detail
    assert ids == ["m/TEE"] and seen["auth"] == "Bearer up"


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (httpx.Response(401, json={}), "refused the upstream key"),
        (httpx.Response(502, text="bad gateway"), "answered HTTP 502"),
        (httpx.Response(200, json={"data": [{**ROW, "confidential_compute": False}]}), "none with"),
        (httpx.Response(200, text="<html>"), "not an OpenAI model list"),
    ],
)
def test_an_upstream_that_cannot_serve_fails_with_a_fix(answer, words):
    check, ids = gateway.upstream_catalog(
        _settings(), {"TEEGATE_UPSTREAM_KEY": "up"}, transport=_upstream(lambda r: answer)
    )
    assert check.status is Status.FAIL and words in check.detail and check.fix
    assert ids == []


def test_an_unreachable_upstream_or_no_key_fails_with_a_fix():
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    check, _ = gateway.upstream_catalog(
        _settings(), {"TEEGATE_UPSTREAM_KEY": "up"}, transport=_upstream(down)
    )
    assert check.status is Status.FAIL and "unreachable" in check.detail
    assert "upstream.base_url" in check.fix
    nokey, _ = gateway.upstream_catalog(_settings(), {})
    assert nokey.status is Status.FAIL and nokey.fix.startswith("export TEEGATE_UPSTREAM_KEY=")


# -- listeners and verdicts -----------------------------------------------------------------------


def _teegate(request: httpx.Request) -> httpx.Response:
    return httpx.Response(401, headers={gateway.MODE_HEADER: "dcap"}, json={})


def test_listeners():
    settings = _settings(listen={"reverse": "127.0.0.1:8080", "egress": ""})
    checks, bound = gateway.listeners(
        settings, connect=lambda h, p: True, transport=_upstream(_teegate)
    )
    assert [c.status for c in checks] == [Status.OK, Status.SKIP]
    assert bound == {"reverse": "http://127.0.0.1:8080"}
    down, bound = gateway.listeners(settings, connect=lambda h, p: False)
    assert down[0].status is Status.FAIL and "teegate run" in down[0].fix and bound == {}
    other, _ = gateway.listeners(
        settings, connect=lambda h, p: True, transport=_upstream(lambda r: httpx.Response(200))
    )
    assert other[0].status is Status.FAIL and "not as teegate" in other[0].detail
    wild = _settings(
        listen={"reverse": "0.0.0.0:0", "egress": "[::]:8081"}, egress={"proxy_auth": "none"}
    )
    checks, bound = gateway.listeners(wild, connect=lambda h, p: True)
    assert checks[0].status is Status.SKIP and bound == {"egress": "http://[::1]:8081"}


def _gateway_models(served: list[str], reasons: dict[str, str]):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": m} for m in served]})
        model = request.url.path.removeprefix("/v1/models/")
        return httpx.Response(404, json={"error": {"message": reasons[model]}})

    return _upstream(answer)


def test_verdicts():
    assert gateway.verdicts(None, "k", ["a"]).detail == "gateway not running"
    assert gateway.verdicts("http://gw", None, ["a"]).status is Status.WARN
    url = "http://gw"
    ok = gateway.verdicts(url, "k", ["a", "b"], transport=_gateway_models(["a", "b"], {}))
    assert ok.status is Status.OK and "2 of 2" in ok.detail
    some = gateway.verdicts(
        url, "k", ["a", "b"], transport=_gateway_models(["a"], {"b": "quote expired"})
    )
    assert some.status is Status.WARN and "b: quote expired" in some.detail
    none = gateway.verdicts(url, "k", ["a"], transport=_gateway_models([], {"a": "no quote"}))
    assert none.status is Status.FAIL


def test_egress_ca(tmp_path: Path):
    settings = _settings(egress={"confdir": str(tmp_path)})
    missing, path = gateway.egress_ca(settings)
    assert missing.status is Status.FAIL and "teegate ca path" in missing.fix and path is None
    ca_cert_path(tmp_path).write_bytes(_pem("x"))
    found, path = gateway.egress_ca(settings)
    assert found.status is Status.OK and path == ca_cert_path(tmp_path)
    off, _ = gateway.egress_ca(_settings(listen={"egress": ""}, egress={"confdir": str(tmp_path)}))
    assert off.status is Status.SKIP


# -- the client's side ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "status"),
    [
        ({}, Status.FAIL),
        ({"HTTPS_PROXY": "http://127.0.0.1:8081"}, Status.OK),
        ({"https_proxy": "localhost:8081"}, Status.OK),  # no scheme, another spelling
        (
            {"HTTPS_PROXY": "http://127.0.0.1:8081", "https_proxy": "http://proxy.corp:3128"},
            Status.FAIL,
        ),
        ({"HTTPS_PROXY": "http://127.0.0.1:9999"}, Status.FAIL),
    ],
)
def test_proxy_variables(env, status):
    check = client.proxy_variables(_settings(upstream={"base_url": "https://llm.example.net"}), env)
    assert check.status is status, check
    if status is Status.FAIL:
        assert check.fix.startswith("export HTTPS_PROXY=http://127.0.0.1:8081")


def test_a_wildcard_listener_is_reached_on_any_local_address_and_passwords_are_hidden():
    settings = _settings(
        listen={"egress": "0.0.0.0:8081"},
        egress={"proxy_auth": "api_key"},
        upstream={"base_url": "https://llm.example.net"},
    )
    check = client.proxy_variables(settings, {"HTTPS_PROXY": "http://app:sk_secret@127.0.0.2:8081"})
    assert check.status is Status.OK and "sk_secret" not in check.detail
    assert "<gateway key>" in client.proxy_variables(settings, {}).fix


def test_a_plain_http_upstream_needs_http_proxy_too():
    settings = _settings()  # http://127.0.0.1:8000
    only_https = client.proxy_variables(settings, {"HTTPS_PROXY": "http://127.0.0.1:8081"})
    assert only_https.status is Status.FAIL and "HTTP_PROXY (or http_proxy)" in only_https.detail
    assert "http_proxy=http://127.0.0.1:8081" in only_https.fix  # curl reads only lower case
    both = {"HTTPS_PROXY": "http://127.0.0.1:8081", "http_proxy": "http://127.0.0.1:8081"}
    assert client.proxy_variables(settings, both).status is Status.OK


def test_no_proxy_that_skips_the_upstream_fails_and_the_fix_keeps_the_rest():
    settings = _settings(upstream={"base_url": "https://llm.example.net"})
    check = client.no_proxy(settings, {"NO_PROXY": "localhost,.example.net,intranet"})
    assert check.status is Status.FAIL and "the confidential upstream" in check.detail
    assert check.fix == "export NO_PROXY=localhost,intranet no_proxy=localhost,intranet"
    listed = client.no_proxy(_settings(), {"no_proxy": "openai.com"})
    assert listed.status is Status.FAIL and "api.openai.com:443 (an LLM API)" in listed.detail
    assert client.no_proxy(_settings(), {"NO_PROXY": "intranet.local"}).status is Status.OK
    assert client.no_proxy(_settings(), {}).status is Status.OK


def test_python_trust(ca, with_ca, without_ca):
    lacking = trust.python_trust(ca, {}, str(without_ca))
    assert lacking.status is Status.FAIL and "SSL_CERT_FILE=" in lacking.fix
    assert "httpx/openai" in lacking.detail and "requests" in lacking.detail
    env = {"SSL_CERT_FILE": str(with_ca), "REQUESTS_CA_BUNDLE": str(with_ca)}
    assert trust.python_trust(ca, env, str(without_ca)).status is Status.OK
    half = trust.python_trust(ca, {"SSL_CERT_FILE": str(with_ca)}, str(without_ca))
    assert half.status is Status.FAIL and "requests loads" in half.detail
    assert "httpx/openai" not in half.detail


def test_system_trust(ca, with_ca, without_ca, tmp_path):
    capath = tmp_path / "certs"
    capath.mkdir()
    (capath / "teegate.pem").write_bytes(ca.read_bytes())
    found = ssl.DefaultVerifyPaths(str(without_ca), str(capath), "", "", "", "")
    assert trust.system_trust(ca, found).status is Status.OK
    absent = ssl.DefaultVerifyPaths(str(without_ca), None, "", "", "", "")
    check = trust.system_trust(ca, absent)
    assert check.status is Status.WARN and "update-ca-certificates" in check.fix


def test_curl_trust(ca, with_ca, without_ca):
    def run(argv):
        return str(without_ca) if argv == ["curl-config", "--ca"] else None

    installed = _which("curl", "curl-config")
    assert trust.curl_trust(ca, {}, _which(), run).status is Status.SKIP
    built_in = trust.curl_trust(ca, {}, installed, run)
    assert built_in.status is Status.FAIL and str(without_ca) in built_in.detail
    assert "CURL_CA_BUNDLE=" in built_in.fix
    assert (
        trust.curl_trust(ca, {"CURL_CA_BUNDLE": str(with_ca)}, installed, run).status is Status.OK
    )


def test_node_trust(ca, with_ca, without_ca):
    node = _which("node")
    assert trust.node_trust(ca, {}, _which()).status is Status.SKIP
    unset = trust.node_trust(ca, {}, node)
    assert unset.status is Status.FAIL and unset.fix.startswith(f"export NODE_EXTRA_CA_CERTS={ca}")
    assert (
        trust.node_trust(ca, {"NODE_EXTRA_CA_CERTS": str(without_ca)}, node).status is Status.FAIL
    )
    assert trust.node_trust(ca, {"NODE_EXTRA_CA_CERTS": "/nope"}, node).status is Status.FAIL
    assert trust.node_trust(ca, {"NODE_EXTRA_CA_CERTS": str(with_ca)}, node).status is Status.OK


@pytest.mark.parametrize(
    ("version", "env", "status"),
    [
        ("v20.11.0", {}, Status.WARN),
        ("v22.21.0", {}, Status.WARN),
        ("v22.21.0", {"NODE_USE_ENV_PROXY": "1"}, Status.OK),
        ("v24.4.0", {"NODE_USE_ENV_PROXY": "1"}, Status.WARN),
    ],
)
def test_node_proxy(version, env, status):
    assert client.node_proxy(env, _which("node"), lambda argv: version).status is status


# -- the command ----------------------------------------------------------------------------------


def test_the_command_is_registered_and_a_broken_config_stops_early(tmp_path: Path, capsys):
    from teegate.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[listen]\nreverse = 8080\n")
    assert main(["doctor", "-c", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["checks"]] == ["configuration loads"]


def test_the_clients_side_only_warns_unless_this_machine_runs_the_apps(tmp_path: Path):
    from teegate.commands.doctor import run_checks

    toml = tmp_path / "proxy.toml"
    toml.write_text(
        f'egress.confdir = "{tmp_path / "ca"}"\n'
        'listen.egress = "127.0.0.1:1"\nlisten.reverse = ""\n'
    )
    ca_cert_path(tmp_path / "ca").parent.mkdir()
    ca_cert_path(tmp_path / "ca").write_bytes(_pem("teegate egress CA"))
    env = {"PATH": ""}  # no proxy variables, no curl, no node
    lenient = {c.name: c.status for c in run_checks(toml, env)}
    strict = {c.name: c.status for c in run_checks(toml, env, client_side=True)}
    name = "proxy variables reach the egress listener"
    assert lenient[name] is Status.WARN and strict[name] is Status.FAIL
    assert lenient["egress listener bound"] is Status.FAIL  # the gateway's side is always needed
