"""Shared fixtures for the attestation tests: the TDX vectors and the test DCAP PKI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from teegate.sandbox.dcap_pki import DcapTestPki
from teegate.sandbox.evidence import EvidenceMinter

REPO_ROOT = Path(__file__).resolve().parents[2]

# A verbatim copy of ../shared/tdx-vectors, held to it by tests/unit/test_data_copies.py.
VECTORS = REPO_ROOT / "tests" / "data" / "tdx"
MANIFEST: list[dict[str, Any]] = json.loads((VECTORS / "MANIFEST.json").read_text())["vectors"]
NOW = 1_760_000_000  # a fixed verification time for minted evidence


def vector(name: str) -> dict[str, Any]:
    return next(v for v in MANIFEST if v["dir"] == name)


def quote_bytes(name: str) -> bytes:
    return (VECTORS / name / "quote.bin").read_bytes()


def collateral_text(name: str) -> str:
    return (VECTORS / name / "collateral.json").read_text()


@pytest.fixture(scope="session")
def pki() -> DcapTestPki:
    return DcapTestPki()


@pytest.fixture(scope="session")
def root_der_file(pki: DcapTestPki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pki") / "test-root.der"
    path.write_bytes(pki.root_ca_der)
    return path


@pytest.fixture
def minter(pki: DcapTestPki) -> EvidenceMinter:
    """The sandbox's evidence generator at a fixed clock (same code the sandbox serves)."""
    return EvidenceMinter(pki, clock=lambda: NOW)
