"""The copies of ../shared/tee-models.json that tests and the sandbox ship stay true to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "tee-models.json"


@pytest.mark.skipif(not SHARED.exists(), reason="no ../shared beside the checkout")
def test_copies_match_the_shared_catalog():
    shared = json.loads(SHARED.read_text())["models"]
    shipped = json.loads((REPO / "sandbox" / "data" / "tee-models.json").read_text())["models"]
    tests = json.loads((REPO / "tests" / "data" / "models.json").read_text())["models"]
    assert shipped == shared
    assert [m for m in tests if not m["id"].startswith("test/")] == shared
