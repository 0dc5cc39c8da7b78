"""The TDX quote vectors (tests/data/tdx) and the fixed clock minted evidence is checked at."""

from __future__ import annotations

import json
from typing import Any

from tests.support.testdata import DATA

# A verbatim copy of ../shared/tdx-vectors, held to it by tests/unit/test_data_copies.py.
VECTORS = DATA / "tdx"
MANIFEST: list[dict[str, Any]] = json.loads((VECTORS / "MANIFEST.json").read_text())["vectors"]
NOW = 1_760_000_000  # a fixed verification time for minted evidence


def vector(name: str) -> dict[str, Any]:
    return next(v for v in MANIFEST if v["dir"] == name)


def quote_bytes(name: str) -> bytes:
    return (VECTORS / name / "quote.bin").read_bytes()


def collateral_text(name: str) -> str:
    return (VECTORS / name / "collateral.json").read_text()
