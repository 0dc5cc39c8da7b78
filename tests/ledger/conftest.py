"""Fixtures for the ledger tests: a fresh database per test, opened for serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from teegate.ledger import Ledger


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "ledger.sqlite3")


@pytest.fixture
async def ledger(db_path: str) -> AsyncIterator[Ledger]:
    led = await Ledger.open(db_path)
    try:
        yield led
    finally:
        await led.close()
