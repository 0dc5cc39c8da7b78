"""Funded accounts for the ledger tests, made through the serving :class:`Ledger`."""

from __future__ import annotations

from dataclasses import dataclass

from teegate.ledger import ApiKey, Ledger, Prices

# $1 per 1M input tokens, $2 per 1M output tokens, $0.50 per 1M cached tokens.
PRICES = Prices(input=1_000_000, output=2_000_000, cache_read=500_000)


@dataclass
class Funded:
    account_id: int
    key: ApiKey
    plaintext: str


async def fund(led: Ledger, name: str, micro: int) -> Funded:
    account = await led.create_account(name, topup_micro=micro)
    key, plaintext = await led.create_key(account.id, label=f"{name}-key")
    return Funded(account.id, key, plaintext)
