"""The gateway CA (``teegate ca path``) and switching the egress listener off."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from teegate.egress.ca import ensure_ca, name_constraints
from teegate.egress.hosts import DEFAULT_LLM_HOSTS, HostPattern
from tests.support.egress import connect_tunnel
from tests.support.gateway_proc import start_gateway
from tests.support.sandbox_proc import start_sandbox
from tests.support.testdata import REPO_ROOT, TEST_MODELS


def _ca_path(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "teegate", "ca", "path", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
    )


def test_ca_path_creates_a_named_owner_only_ca_once(tmp_path):
    confdir = tmp_path / "conf"
    config = tmp_path / "proxy.toml"
    config.write_text(f'egress.confdir = "{confdir}"\n')
    first = _ca_path(config)
    assert first.returncode == 0, first.stderr
    cert_path = Path(first.stdout.strip())
    assert cert_path == (confdir / "mitmproxy-ca-cert.pem").resolve()
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "teegate egress CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert confdir.stat().st_mode & 0o777 == 0o700
    assert (confdir / "mitmproxy-ca.pem").stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" not in cert_path.read_bytes()
    pem = cert_path.read_bytes()
    again = _ca_path(config)
    assert again.returncode == 0 and Path(again.stdout.strip()) == cert_path
    assert cert_path.read_bytes() == pem  # not re-created


def test_a_ca_with_its_certificate_deleted_is_an_error(tmp_path):
    cert = ensure_ca(tmp_path / "conf")
    cert.unlink()
    with pytest.raises(FileNotFoundError):
        ensure_ca(tmp_path / "conf")


def test_ca_path_reports_a_bad_config(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text("egress.confdirr = '/x'\n")
    out = _ca_path(config)
    assert out.returncode == 2 and "egress.confdirr: unknown key" in out.stderr


def test_a_ca_made_before_the_first_start_is_the_one_the_gateway_uses(tmp_path):
    confdir = tmp_path / "conf"
    ca = x509.load_pem_x509_certificate(ensure_ca(confdir).read_bytes())
    tls = tmp_path / "tls"
    with (
        start_sandbox("--models", str(TEST_MODELS), "--tls-dir", str(tls)) as up,
        start_gateway(
            up.base_url,
            extra_toml=f'egress.confdir = "{confdir}"\nupstream.ca_file = "{tls / "ca.pem"}"',
        ) as gw,
    ):
        ctx = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
        with connect_tunnel(gw, "127.0.0.1", up.port) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                leaf = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
    leaf.verify_directly_issued_by(ca)
    assert "egress_ca_unconstrained" in gw.log_text()  # made without hosts: used, with a warning


def test_the_egress_listener_can_be_switched_off():
    with (
        start_sandbox("--models", str(TEST_MODELS)) as up,
        start_gateway(up.base_url, extra_toml='listen.egress = ""') as gw,
    ):
        assert set(gw.urls) == {"reverse", "admin"}  # the admin listener is not egress


def _verify(ca: x509.Certificate, leaf: x509.Certificate, host: str) -> None:
    """What a TLS client does with the leaf: chain to the CA, honouring its constraints."""
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(host))
    verifier.verify(leaf, [])


def test_the_ca_permits_only_the_hosts_it_intercepts(tmp_path):
    from cryptography.x509.verification import VerificationError
    from mitmproxy import certs

    confdir = tmp_path / "conf"
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'egress.confdir = "{confdir}"\n'
        'upstream.base_url = "https://llm.confidential.example"\n'
        'egress.llm_hosts = ["api.openai.com", "*.openai.azure.com", "10.9.8.7"]\n'
    )
    out = _ca_path(config)
    assert out.returncode == 0, out.stderr
    ca = x509.load_pem_x509_certificate(Path(out.stdout.strip()).read_bytes())
    ext = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert {str(n.value) for n in ext.value.permitted_subtrees} == {
        "llm.confidential.example",
        "api.openai.com",
        "openai.azure.com",
        "10.9.8.7/32",
        "10.9.8.7",
    }
    store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    for host in ("api.openai.com", "eastus.openai.azure.com", "llm.confidential.example"):
        leaf = store.get_cert(host, [x509.DNSName(host)]).cert.to_cryptography()
        _verify(ca, leaf, host)
    forged = store.get_cert("bank.example", [x509.DNSName("bank.example")]).cert
    with pytest.raises(VerificationError):  # a copy of the key cannot impersonate other sites
        _verify(ca, forged.to_cryptography(), "bank.example")


def test_a_ca_that_does_not_cover_a_newly_listed_host_stops_the_start(tmp_path):
    confdir = tmp_path / "conf"
    config = tmp_path / "proxy.toml"
    base = (
        f'egress.confdir = "{confdir}"\nledger.path = "{tmp_path / "ledger.sqlite3"}"\n'
        'upstream.api_key = "k"\negress.llm_hosts = ["api.openai.com"]\n'
    )
    config.write_text(base)
    assert _ca_path(config).returncode == 0
    config.write_text(base + 'egress.extra_llm_hosts = ["api.newcomer.ai"]\n')
    out = _ca_path(config)
    assert out.returncode == 2
    assert "does not permit api.newcomer.ai" in out.stderr and "remove the CA files" in out.stderr
    run = subprocess.run(
        [sys.executable, "-m", "teegate", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert run.returncode == 2 and "does not permit api.newcomer.ai" in run.stderr


def _sample(pattern: str) -> str:
    """A host the pattern matches, each ``*`` standing for one or two labels' worth."""
    return pattern.replace("*.", "a.b.").replace("*", "x1")


@pytest.fixture(scope="module")
def shipped_ca(tmp_path_factory: pytest.TempPathFactory):
    """The CA ``teegate ca path`` makes for the shipped host list, and its signing store."""
    from mitmproxy import certs

    tmp = tmp_path_factory.mktemp("shipped-ca")
    config = tmp / "proxy.toml"
    config.write_text(
        f'egress.confdir = "{tmp / "conf"}"\nupstream.base_url = "https://llm.confidential.example"\n'
    )
    out = _ca_path(config)
    assert out.returncode == 0, out.stderr
    ca = x509.load_pem_x509_certificate(Path(out.stdout.strip()).read_bytes())
    return ca, certs.CertStore.from_store(tmp / "conf", "mitmproxy", 2048)


@pytest.mark.parametrize("pattern", DEFAULT_LLM_HOSTS)
def test_every_shipped_entry_is_covered_by_the_name_constraints(shipped_ca, pattern):
    """A leaf the gateway signs for a host matching the entry verifies under the CA."""
    ca, store = shipped_ca
    host = _sample(pattern)
    assert HostPattern.parse(pattern).matches(host, 443)
    leaf = store.get_cert(host, [x509.DNSName(host)]).cert.to_cryptography()
    _verify(ca, leaf, host)


def test_the_shipped_ca_still_refuses_other_sites(shipped_ca):
    from cryptography.x509.verification import VerificationError

    ca, store = shipped_ca
    for host in ("bank.example", "openai.com.evil.example", "www.anthropic.com"):
        leaf = store.get_cert(host, [x509.DNSName(host)]).cert.to_cryptography()
        with pytest.raises(VerificationError):
            _verify(ca, leaf, host)


def test_a_localhost_upstream_is_permitted_by_name_and_address():
    nc = name_constraints(["localhost", "127.1"])
    assert nc is not None
    assert {str(n.value) for n in nc.permitted_subtrees} == {
        "localhost",
        "127.0.0.1",
        "127.0.0.1/32",
    }
