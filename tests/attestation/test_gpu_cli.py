"""``teegate attest gpu`` and the GPU part of ``teegate attest verify --report``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from teegate.cli import main
from teegate.sandbox.dcap_pki import DcapTestPki
from teegate.sandbox.evidence import EvidenceMinter
from tests.support.gpu_vectors import (
    VECTORS,
    folder,
    raw_vector_payload,
    sandbox_gpu_root_file,
)
from tests.support.tdx_vectors import NOW


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    rc = main(args)
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip() else {}


def _gpu(payload: Path, vector_id: str, *extra: str) -> list[str]:
    v = VECTORS[vector_id]
    return ["attest", "gpu", str(payload), "--at", str(v["at"]),
            "--nonce", v["expected_nonce"], *extra]  # fmt: skip


def test_eight_gpus_pass_with_nothing_claimed_beyond_the_evidence(capsys) -> None:
    rc, doc = _run(_gpu(folder("V2") / "nvidia_payload.json", "V2", "--gpu-count", "8"), capsys)
    assert rc == 0 and doc["ok"] is True and doc["gpu_count"] == 8
    assert (doc["measurements"], doc["revocation"]) == ("unverified", "unchecked")
    assert doc["checks"]["gpu_nonce"] is True and doc["root"] == "nvidia"


def test_rims_and_ocsp(tmp_path: Path, capsys) -> None:
    payload = tmp_path / "v1.json"
    payload.write_text(raw_vector_payload("V1"))
    d = folder("V1")
    rc, doc = _run(_gpu(payload, "V1", "--rims", str(d / "rim"), "--ocsp", str(d / "ocsp")), capsys)
    assert rc == 0 and doc["measurements"] == "verified"
    assert doc["revocation"] == "unchecked"  # the device-chain answers are stale at `at`
    assert doc["checks"]["gpu_measurements_match"] is True


@pytest.mark.parametrize("vector_id", ["N2", "N3"])
def test_derived_negatives_exit_1(vector_id: str, capsys) -> None:
    rc, doc = _run(_gpu(folder(vector_id) / "nvidia_payload.json", vector_id), capsys)
    assert rc == 1 and doc["ok"] is False


def test_without_a_nonce_nothing_passes(capsys) -> None:
    v = VECTORS["V2"]
    args = ["attest", "gpu", str(folder("V2") / "nvidia_payload.json"), "--at", str(v["at"])]
    rc, doc = _run(args, capsys)
    assert rc == 1 and doc["checks"]["gpu_nonce"] is False


def test_bad_input_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["attest", "gpu", str(tmp_path / "missing.json"), "--at", "1"]) == 2
    args = _gpu(folder("V2") / "nvidia_payload.json", "V2", "--rims", str(tmp_path / "no"))
    assert main(args) == 2


def test_verify_a_whole_report_reports_the_gpu_part(
    tmp_path: Path, pki: DcapTestPki, root_der_file: Path, capsys
) -> None:
    nonce = os.urandom(32)
    minter = EvidenceMinter(pki, clock=lambda: NOW)
    report = tmp_path / "report.json"
    report.write_text(json.dumps(minter.report("m", nonce)))
    collateral = tmp_path / "collateral.json"
    collateral.write_text(json.dumps(minter.report("m", nonce)["collateral"]))
    args = ["attest", "verify", "--report", str(report), "--collateral", str(collateral),
            "--at", str(NOW), "--nonce", nonce.hex(),
            "--test-root-ca", str(root_der_file)]  # fmt: skip
    rc, doc = _run(args, capsys)  # NVIDIA's root: the sandbox's test GPUs are refused
    assert rc == 1 and doc["gpu"]["ok"] is False and doc["checks"]["quote_verified"] is True
    assert "GPU evidence rejected" in doc["reason"]
    rc, doc = _run([*args, "--gpu-test-root-ca", str(sandbox_gpu_root_file())], capsys)
    assert rc == 0 and doc["ok"] is True
    assert doc["gpu"]["ok"] is True and doc["gpu"]["gpu_count"] == 2
    assert doc["checks"]["gpu_evidence_verified"] is True
    minter.set_mode("m", "gpu_stale_nonce")
    report.write_text(json.dumps(minter.report("m", nonce)))
    rc, doc = _run([*args, "--gpu-test-root-ca", str(sandbox_gpu_root_file())], capsys)
    assert rc == 1 and doc["gpu"]["checks"]["gpu_nonce"] is False
    assert doc["checks"]["report_data_nonce"] is True  # the CPU side still binds our nonce
