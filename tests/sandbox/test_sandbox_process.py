"""Process-level behaviour of ``python -m teegate.sandbox``: options, readiness, signals, TLS."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.support.sandbox_proc import REPO_ROOT, SandboxStartError, start_sandbox

MODEL = "zai-org/GLM-5.1-TEE"
USER = [{"role": "user", "content": "hi"}]


def test_command_line_options_and_sigint(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = start_sandbox("--api-key", "k-123", "--chunks", "3", "--ready-file", str(ready))
    try:
        assert proc.base_url == f"http://127.0.0.1:{proc.port}"
        assert json.loads(ready.read_text()) == {"base_url": proc.base_url, "port": proc.port}
        with httpx.Client(base_url=proc.api_base) as bare:
            default_key = {"Authorization": "Bearer sandbox-upstream-key"}
            assert bare.get("/models", headers=default_key).status_code == 401
        with proc.client() as api:
            body = api.post("/chat/completions", json={"model": MODEL, "messages": USER}).json()
        assert body["usage"]["completion_tokens"] == 3
        proc.process.send_signal(signal.SIGINT)
        assert proc.process.wait(timeout=5) == 0
    finally:
        proc.stop()


def test_sigterm_exits_cleanly() -> None:
    proc = start_sandbox("--delay-ms", "1")
    assert proc.behaviour()["delay_ms"] == 1  # the command line sets the baseline
    assert proc.stop() == 0


def test_start_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(SandboxStartError):
        start_sandbox("--models", str(tmp_path / "missing.json"))


def _served_cert(proc_port: int) -> x509.Certificate:
    pem = ssl.get_server_certificate(("127.0.0.1", proc_port))
    return x509.load_pem_x509_certificate(pem.encode())


def test_tls_with_generated_ca(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    with start_sandbox("--tls-dir", str(tls_dir), "--tls-hostname", "upstream.test") as proc:
        assert proc.base_url.startswith("https://127.0.0.1:")
        assert proc.ca_file == tls_dir / "ca.pem"
        with proc.client() as api:
            assert api.get("/models").status_code == 200
        with pytest.raises(httpx.ConnectError):  # not trusted without the test CA
            httpx.get(f"{proc.api_base}/models")
        # Also valid for "localhost" (hostname check, not just the IP).
        localhost = proc.base_url.replace("127.0.0.1", "localhost")
        headers = {"Authorization": f"Bearer {proc.api_key}"}
        assert httpx.get(f"{localhost}/v1/models", verify=proc.verify(), headers=headers).is_success
        names = (
            _served_cert(proc.port)
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value
        )
        assert "upstream.test" in names.get_values_for_type(x509.DNSName)
        assert proc.stats()["total"] == 2
    ca_before = (tls_dir / "ca.pem").read_bytes()
    server_before = (tls_dir / "server.pem").read_bytes()
    # Restart: same CA; the server cert is re-issued only because a new name is asked for.
    with start_sandbox("--tls-dir", str(tls_dir), "--tls-hostname", "other.test") as proc:
        with proc.client() as api:
            assert api.get("/models").status_code == 200
    assert (tls_dir / "ca.pem").read_bytes() == ca_before
    assert (tls_dir / "server.pem").read_bytes() != server_before
    server_after = (tls_dir / "server.pem").read_bytes()
    with start_sandbox("--tls-dir", str(tls_dir), "--tls-hostname", "other.test"):
        pass
    assert (tls_dir / "server.pem").read_bytes() == server_after  # reused as is


def test_help_lists_the_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "teegate.sandbox", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for option in ("--api-key", "--chunks", "--chunk-delay-ms", "--tls-dir", "--ready-file"):
        assert option in out
