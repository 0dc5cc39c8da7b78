"""A ledger that cannot answer (its database restarting) refuses with a retryable 503, never a
500, in every addon that asks it before a request may leave: Auth (key lookup), RateLimit
(a shared count) and Billing (the reservation; tests/billing/test_pg_outages.py runs all three
against a stopped PostgreSQL)."""

from __future__ import annotations

import json

from mitmproxy.test import taddons, tflow, tutils

from teegate.addons import flowstate
from teegate.addons.auth import Auth
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.ratelimit import RateLimit
from teegate.config import RateLimitSettings
from teegate.ledger import ApiKey, LedgerUnavailable


class DownLedger:
    """Every database question fails as PgLedger's do while the server is away."""

    shared_rate_limits = True
    key_prefix = "vgpu_sk_"

    async def authenticate(self, presented: str) -> ApiKey | None:
        raise LedgerUnavailable("cannot connect")

    async def count_request(self, key: ApiKey) -> tuple[int, int]:
        raise LedgerUnavailable("cannot connect")


def _assert_billing_unavailable(flow) -> None:
    assert flow.response is not None and flow.response.status_code == 503
    assert json.loads(flow.response.content)["error"]["code"] == "billing_unavailable"
    assert flow.response.headers["x-should-retry"] == "true"


async def test_auth_refuses_with_a_retryable_503_when_the_key_cannot_be_looked_up() -> None:
    addon = Auth(LedgerLink(DownLedger()))  # type: ignore[arg-type]
    flow = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/v1/chat/completions"))
    flow.request.headers["authorization"] = "Bearer vgpu_sk_" + "a" * 40
    with taddons.context(addon):
        await addon.request(flow)
    _assert_billing_unavailable(flow)


async def test_a_shared_count_that_fails_refuses_with_a_retryable_503() -> None:
    addon = RateLimit(RateLimitSettings(requests_per_minute=5), LedgerLink(DownLedger()))  # type: ignore[arg-type]
    flow = tflow.tflow(req=tutils.treq(method=b"GET", path=b"/v1/models"))
    flowstate.set_api_key(flow, ApiKey(key_id=1, account_id=1, label=None, rate_limit=None))
    with taddons.context(addon):
        await addon.request(flow)
    _assert_billing_unavailable(flow)
