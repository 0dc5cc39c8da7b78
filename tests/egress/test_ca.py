"""The gateway CA (``teegate ca path``) and switching the egress listener off."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from addons.egress_ca import ensure_ca
from tests.egress.conftest import REPO, TEST_MODELS, connect_tunnel
from tests.support.gateway_proc import start_gateway
from tests.support.sandbox_proc import start_sandbox


def _ca_path(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "teegate", "ca", "path", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
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


def test_the_egress_listener_can_be_switched_off():
    with (
        start_sandbox("--models", str(TEST_MODELS)) as up,
        start_gateway(up.base_url, extra_toml='listen.egress = ""') as gw,
    ):
        assert set(gw.urls) == {"reverse"}
