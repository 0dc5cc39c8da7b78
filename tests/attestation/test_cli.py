"""``teegate attest verify`` / ``fetch``, run in-process through ``teegate.cli.main``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dcap_qvl
import httpx
import pytest

from teegate.cli import main
from teegate.sandbox.dcap_pki import DcapTestPki
from teegate.sandbox.evidence import EvidenceMinter
from tests.support.sandbox_proc import start_sandbox
from tests.support.tdx_vectors import NOW, VECTORS, vector


def _verify_args(name: str, *extra: str) -> list[str]:
    return [
        "attest", "verify",
        "--quote", str(VECTORS / name / "quote.bin"),
        "--collateral", str(VECTORS / name / "collateral.json"),
        "--at", str(vector(name)["at"]),
        *extra,
    ]  # fmt: skip


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    rc = main(args)
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip() else {}


def test_real_quote_prints_the_verdict_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = _run(_verify_args("dcap-qvl-tdx-v4"), capsys)
    assert rc == 0
    assert doc["ok"] is True and doc["tee_type"] == "TDX" and doc["tcb_status"] == "UpToDate"
    assert doc["advisory_ids"] == []
    report = dcap_qvl.parse_quote((VECTORS / "dcap-qvl-tdx-v4" / "quote.bin").read_bytes()).report
    assert doc["mrtd"] == report.mr_td.hex()
    assert doc["rtmrs"] == [getattr(report, f"rt_mr{i}").hex() for i in range(4)]
    assert doc["report_data"] == report.report_data.hex()
    assert doc["checks"]["quote_verified"] is True
    assert "evidence" not in doc


def test_dstack_quote_with_event_log_and_info(capsys: pytest.CaptureFixture[str]) -> None:
    d = VECTORS / "dstack-nearai"
    args = _verify_args("dstack-nearai", "--event-log", str(d / "event_log.json"))
    rc, doc = _run([*args, "--info", str(d / "info.json")], capsys)
    assert rc == 0
    assert doc["checks"]["event_log_replays"] is True
    assert doc["checks"]["app_compose_matches"] is True


def test_sgx_quote_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = _run(_verify_args("dcap-qvl-sgx"), capsys)
    assert rc == 1
    assert doc["ok"] is False and doc["checks"]["tee_type_tdx"] is False


def test_nonce(capsys: pytest.CaptureFixture[str]) -> None:
    quote = (VECTORS / "dcap-qvl-tdx-v4" / "quote.bin").read_bytes()
    bound = dcap_qvl.parse_quote(quote).report.report_data[32:].hex()
    rc, doc = _run(_verify_args("dcap-qvl-tdx-v4", "--nonce", bound), capsys)
    assert rc == 0 and doc["checks"]["report_data_nonce"] is True
    rc, doc = _run(_verify_args("dcap-qvl-tdx-v4", "--nonce", "00" * 32), capsys)
    assert rc == 1 and doc["reason"] == "attestation failed: report_data does not bind our nonce"
    rc, _ = _run(_verify_args("dcap-qvl-tdx-v4", "--nonce", "00"), capsys)
    assert rc == 2


def test_policy_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "proxy.toml"
    policy.write_text(f"[attestation]\nmrtd_allowlist = ['{'00' * 48}']\n")
    rc, doc = _run(_verify_args("dcap-qvl-tdx-v4", "--policy", str(policy)), capsys)
    assert rc == 1 and doc["checks"]["mrtd_allowed"] is False
    policy.write_text("[attestation]\nmrtd_allowlist = 'not a list'\n")
    rc, _ = _run(_verify_args("dcap-qvl-tdx-v4", "--policy", str(policy)), capsys)
    assert rc == 2


def test_minted_quote_needs_the_test_root(
    tmp_path: Path, pki: DcapTestPki, root_der_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nonce = os.urandom(32)
    evidence = EvidenceMinter(pki, clock=lambda: NOW).report("m", nonce)
    quote = tmp_path / "quote.hex"
    quote.write_text(evidence["intel_quote"])  # hex text is accepted as well as binary
    collateral = tmp_path / "collateral.json"
    collateral.write_text(json.dumps(evidence["collateral"]))
    args = ["attest", "verify", "--quote", str(quote), "--collateral", str(collateral),
            "--at", str(NOW), "--nonce", nonce.hex()]  # fmt: skip
    rc, doc = _run(args, capsys)
    assert rc == 1 and doc["root"] == "intel"
    rc, doc = _run([*args, "--test-root-ca", str(root_der_file)], capsys)
    assert rc == 0 and doc["root"] == "test" and doc["ok"] is True


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["attest", "verify", "--quote", "/nonexistent", "--collateral", "/nonexistent",
            "--at", "1"]  # fmt: skip
    assert main(args) == 2
    assert "teegate attest:" in capsys.readouterr().err


def test_fetch_against_the_sandbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with start_sandbox() as sandbox:
        root = tmp_path / "root.der"
        root.write_bytes(httpx.get(f"{sandbox.base_url}/_sandbox/evidence/root_ca.der").content)
        gpu_root = tmp_path / "gpu-root.pem"
        gpu_root.write_bytes(
            httpx.get(f"{sandbox.base_url}/_sandbox/evidence/gpu_root_ca.pem").content
        )
        with sandbox.client() as api:
            models = api.get("/models").json()["data"]
        model = next(m["id"] for m in models if m.get("confidential_compute") is True)
        policy = tmp_path / "proxy.toml"
        policy.write_text(
            f"[upstream]\nbase_url = '{sandbox.base_url}'\napi_key = '{sandbox.api_key}'\n"
        )
        base = ["attest", "fetch", "--model", model, "--policy", str(policy),
                "--gpu-test-root-ca", str(gpu_root)]  # fmt: skip
        rc, doc = _run([*base, "--test-root-ca", str(root), "--show-evidence"], capsys)
        assert rc == 0, doc
        assert doc["ok"] is True and doc["model"] == model
        assert doc["gpu"]["ok"] is True and doc["gpu"]["root"] == "test"
        assert doc["evidence"]["intel_quote"]
        httpx.post(f"{sandbox.base_url}/_sandbox/evidence", json={model: "debug"})
        rc, doc = _run([*base, "--test-root-ca", str(root)], capsys)
        assert rc == 1 and doc["reason"].startswith("attestation failed: debug TD")
