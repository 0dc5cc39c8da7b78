"""``GET /v1/account``: what a key holder may see of their own account.

The key in ``Authorization`` picks the account (Auth has already checked it); nothing in the
request can name another one. The answer is the account's balance, its open holds, and its
usage by model and UTC day over the last 30 days (every key of the account), like the key
endpoints of hosted gateways, so a holder can check live usage without the operator.

Runs after Auth and RateLimit and before the Router (which would answer 404), like the
attestation report; it answers locally and nothing goes upstream.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import (
    billing_unavailable,
    guarded,
    json_response,
    method_not_allowed,
    refuse,
)
from teegate.addons.flowstate import Route
from teegate.addons.ledgerlink import LedgerLink
from teegate.ledger import ApiKey, Ledger, LedgerError, UsageGroup
from teegate.money import format_usd

ACCOUNT_PATH = "/v1/account"
USAGE_DAYS = 30


class AccountEndpoint:
    def __init__(self, link: LedgerLink) -> None:
        self._link = link

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flowstate.route(flow) == Route.PASSTHROUGH:
            return
        path = flow.request.path.split("?", 1)[0]
        if path != ACCOUNT_PATH:
            return
        flowstate.set_route(flow, Route.LOCAL)
        method = flow.request.method.upper()
        if method != "GET":
            refuse(flow, method_not_allowed(method[:16], path, "GET"))
            return
        key = flowstate.need(flowstate.api_key(flow), "api key")
        try:
            body = await account_view(self._link.get(), key)
        except LedgerError:
            refuse(flow, billing_unavailable())
            return
        flow.response = json_response(200, body, {"cache-control": "no-store"})


async def account_view(ledger: Ledger, key: ApiKey) -> dict[str, Any]:
    """The answer of ``GET /v1/account`` for ``key`` (also the dashboard's key-holder view)."""
    account = await ledger.account(key.account_id)
    if account is None:  # the key authenticated: its account exists
        raise LedgerError("the key's account is gone")
    since_ms = (int(time.time()) // 86400 - (USAGE_DAYS - 1)) * 86400 * 1000
    usage = await ledger.usage(account_id=account.id, since_ms=since_ms)
    holds = await ledger.open_reservations(account.id)
    held = sum(r.amount_micro for r in holds)
    return {
        "object": "account",
        "account": {"id": account.id, "name": account.name},
        "key": {"id": key.key_id, "label": key.label, "rate_limit": key.rate_limit},
        # The stored balance already has open holds taken off: it is what can be spent.
        "balance_micro": account.balance_micro,
        "balance_usd": format_usd(account.balance_micro),
        "open_holds": {
            "count": len(holds),
            "held_micro": held,
            "held_usd": format_usd(held),
        },
        "usage_days": USAGE_DAYS,
        "usage": by_day_and_model(usage),
    }


def by_day_and_model(groups: list[UsageGroup]) -> list[dict[str, Any]]:
    """Usage groups (per key) summed per (UTC day, model), in day order."""
    sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * 5)
    for g in groups:
        row = sums[(g.day, g.model)]
        counts = (g.requests, g.prompt_tokens, g.completion_tokens, g.cached_tokens, g.charge_micro)
        for i, n in enumerate(counts):
            row[i] += n
    return [
        {
            "day": day,
            "model": model,
            "requests": r[0],
            "prompt_tokens": r[1],
            "completion_tokens": r[2],
            "cached_tokens": r[3],
            "charge_micro": r[4],
            "charge_usd": format_usd(r[4]),
        }
        for (day, model), r in sorted(sums.items())
    ]
