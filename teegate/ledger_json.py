"""The JSON shapes of ledger objects, shared by the command line's ``--json`` and the admin API.

One definition, so a script written against ``teegate keys list --json`` reads the admin API's
``/admin/v1/keys`` the same way. Amounts are integer micro-USD with a USD string beside them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from teegate.ledger import Account, KeyInfo, UsageGroup, format_usd


def when(ms: int | None) -> str:
    """A ledger timestamp (Unix milliseconds) as UTC text, ``-`` for never."""
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def day_start_ms(text: str | None) -> int | None:
    """``YYYY-MM-DD`` as the Unix milliseconds its UTC day starts at (ValueError otherwise)."""
    if text is None:
        return None
    day = dt.date.fromisoformat(text)
    if len(text) != 10:
        raise ValueError(text)
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return int(start.timestamp()) * 1000


def account_json(a: Account, *, active_keys: int) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "balance_micro": a.balance_micro,
        "balance_usd": format_usd(a.balance_micro),
        "active_keys": active_keys,
        "created": when(a.created_ms),
    }


def key_json(k: KeyInfo) -> dict[str, Any]:
    """A key as listed: ids, label, limit and dates; a key's secret is never stored to show."""
    d = asdict(k)
    d["created"] = when(k.created_ms)
    d["revoked"] = when(k.revoked_ms) if k.revoked_ms else None
    return d


def usage_json(g: UsageGroup) -> dict[str, Any]:
    """One group of ``teegate usage`` (per UTC day, account, key and model)."""
    d = asdict(g)
    d["charge_usd"] = format_usd(g.charge_micro)
    d["unrecovered_usd"] = format_usd(g.unrecovered_micro)
    return d


def active_keys(keys: list[KeyInfo]) -> dict[int, int]:
    """Active (unrevoked) keys per account id."""
    counts: dict[int, int] = {}
    for k in keys:
        if k.revoked_ms is None:
            counts[k.account_id] = counts.get(k.account_id, 0) + 1
    return counts
