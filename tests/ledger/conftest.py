"""Fixtures for the ledger tests: a fresh database per test, opened for serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from teegate.ledger import ApiKey, Ledger, Prices

# $1 per 1M input tokens, $2 per 1M output tokens, $0.50 per 1M cached tokens.
PRICES = Prices(input=1_000_000, output=2_000_000, cache_read=500_000)


@dataclass
class Funded:
    account_id: int
    key: ApiKey
    plaintext: str


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


async def fund(led: Ledger, name: str, micro: int) -> Funded:
    account = await led.create_account(name, topup_micro=micro)
    key, plaintext = await led.create_key(account.id, label=f"{name}-key")
    return Funded(account.id, key, plaintext)
