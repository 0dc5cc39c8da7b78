"""One sandbox process per test module, reset before every test (fast, yet isolated)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.sandbox_proc import SandboxProc, start_sandbox

REPO_ROOT = Path(__file__).resolve().parents[2]

SHIPPED_MODELS = REPO_ROOT / "sandbox" / "data" / "tee-models.json"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProc]:
    with start_sandbox() as proc:
        yield proc


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "sandbox" in request.fixturenames:
        request.getfixturevalue("sandbox").reset()


@pytest.fixture
def api(sandbox: SandboxProc) -> Iterator[httpx.Client]:
    with sandbox.client(timeout=10.0) as client:
        yield client


@pytest.fixture(scope="session")
def tee_spec() -> dict[str, Any]:
    """The list of the 16 TEE models with their public (post-markup) prices.

    Read from the sandbox's copy, which tests/unit/test_data_copies.py keeps identical to
    ../shared/tee-models.json (by checksum, on every machine).
    """
    return json.loads(SHIPPED_MODELS.read_text(encoding="utf-8"))
