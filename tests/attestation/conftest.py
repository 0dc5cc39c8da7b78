"""Fixtures for the attestation tests: the test DCAP PKI and evidence minted with it
(the TDX vectors themselves: tests/support/tdx_vectors.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from teegate.sandbox.dcap_pki import DcapTestPki
from teegate.sandbox.evidence import EvidenceMinter
from tests.support.tdx_vectors import NOW


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
