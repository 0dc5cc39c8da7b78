"""The admin API: accounts, keys, usage, attestation verdicts and recent refusals, as JSON.

Every path is under ``/admin/v1`` and needs an admin token (:mod:`.envelope`). Writes go
through the gateway's :class:`teegate.ledger.Ledger`, whose operator methods call the same
:class:`teegate.ledger.Store` operations the ``teegate accounts|keys`` commands call, and
take effect in this process at once (a top-up is spendable, a revocation refuses the key,
before the response is sent). JSON shapes are the command line's ``--json`` ones
(:mod:`teegate.ledger_json`), with USD strings beside integer micro-USD.

Amounts are strings (``"amount_usd": "10.00"``) or integers (``"amount_micro"``), never JSON
numbers with a fraction: money is never a float. A top-up may carry an ``Idempotency-Key``
header; repeating it (a retry after a timeout) answers the first top-up's result with
``"replayed": true`` and credits nothing. A new API key is in the response of its creation
and nowhere else, ever.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import structlog
from aiohttp import web

from teegate.addons.attestation import AttestationSync
from teegate.addons.attestation_report import AttestationReport
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.errors import GatewayError
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.metrics import RecentRefusals
from teegate.admin.envelope import invalid
from teegate.ledger import Ledger, UnknownKey, format_usd, parse_usd
from teegate.ledger.inputs import MAX_IDEMPOTENCY_KEY
from teegate.ledger_json import account_json, active_keys, day_start_ms, key_json, usage_json

log = structlog.get_logger("teegate.admin")

PREFIX = "/admin/v1"
MAX_BODY = 64 * 1024
NO_STORE = {"cache-control": "no-store"}


def ok(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, headers=NO_STORE)


async def json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise GatewayError(413, "The request body is too large.", "request_too_large")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise GatewayError(413, "The request body is too large.", "request_too_large")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object.", code="invalid_json")
    return body


def amount_micro(body: dict[str, Any], usd: str = "amount_usd", micro: str = "amount_micro") -> int:
    """A positive amount from ``usd`` (a decimal string) or ``micro`` (an integer)."""
    if usd in body and micro in body:
        raise invalid(f"Give either '{usd}' or '{micro}', not both.", usd)
    if usd in body:
        text = body[usd]
        if not isinstance(text, str):
            raise invalid(f"'{usd}' must be a string such as \"10.00\" (never a float).", usd)
        value = parse_usd(text)
    elif micro in body:
        value = body[micro]
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"'{micro}' must be an integer number of micro-USD.", micro)
    else:
        raise invalid(f"Missing '{usd}'.", usd, "missing_required_parameter")
    if value <= 0:
        raise invalid("The amount must be positive.", usd)
    return value


def optional_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(f"'{name}' must be a string.", name)
    return value


def rate_limit(body: dict[str, Any]) -> int | None:
    value = body.get("rate_limit")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise invalid(
            "'rate_limit' must be an integer (requests per minute) or null.", "rate_limit"
        )
    return value


def key_id(request: web.Request) -> int:
    text = request.match_info["key_id"]
    if not text.isdigit() or len(text) > 18:
        raise GatewayError(404, "No API key with that id.", "key_not_found")
    return int(text)


class AdminApi:
    def __init__(
        self,
        link: LedgerLink,
        catalog: CatalogSync,
        attestation: AttestationSync,
        refusals: RecentRefusals,
    ) -> None:
        self._link = link
        self._catalog = catalog
        self._attestation = attestation
        self._report = AttestationReport(catalog, attestation)
        self._refusals = refusals

    def routes(self) -> list[web.RouteDef]:
        p = PREFIX
        return [
            web.get(f"{p}/accounts", self.list_accounts),
            web.post(f"{p}/accounts", self.create_account),
            web.get(f"{p}/accounts/{{account}}", self.show_account),
            web.post(f"{p}/accounts/{{account}}/topups", self.topup),
            web.get(f"{p}/accounts/{{account}}/keys", self.account_keys),
            web.post(f"{p}/accounts/{{account}}/keys", self.create_key),
            web.get(f"{p}/keys", self.list_keys),
            web.get(f"{p}/keys/{{key_id}}", self.show_key),
            web.patch(f"{p}/keys/{{key_id}}", self.update_key),
            web.post(f"{p}/keys/{{key_id}}/revoke", self.revoke_key),
            web.get(f"{p}/usage", self.usage),
            web.get(f"{p}/usage/timeline", self.timeline),
            web.get(f"{p}/attestation", self.verdicts),
            web.get(f"{p}/attestation/report", self.evidence),
            web.get(f"{p}/refusals", self.refusals),
        ]

    @property
    def _ledger(self) -> Ledger:
        return self._link.get()

    # -- accounts ----------------------------------------------------------------------

    async def list_accounts(self, _request: web.Request) -> web.Response:
        ledger = self._ledger
        active = active_keys(await ledger.list_keys())
        accounts = await ledger.list_accounts()
        return ok(
            {
                "object": "list",
                "data": [account_json(a, active_keys=active.get(a.id, 0)) for a in accounts],
            }
        )

    async def create_account(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        name = body.get("name")
        initial = amount_micro(body, "topup_usd", "topup_micro") if (
            "topup_usd" in body or "topup_micro" in body
        ) else 0
        account = await self._ledger.create_account(name, topup_micro=initial)  # type: ignore[arg-type]
        log.info("admin_account_created", account_id=account.id, topup_micro=initial)
        return ok(await self._account(account.id), 201)

    async def show_account(self, request: web.Request) -> web.Response:
        return ok(await self._account(request.match_info["account"]))

    async def _account(self, ref: int | str) -> dict[str, Any]:
        """``teegate accounts show --json``: the account, its keys, totals and open holds."""
        ledger = self._ledger
        account = await _require_account(ledger, ref)
        keys = await ledger.list_keys(account.id)
        usage = await ledger.usage(account_id=account.id)
        holds = await ledger.open_reservations(account.id)
        held = sum(r.amount_micro for r in holds)
        charged = sum(g.charge_micro for g in usage)
        return {
            **account_json(account, active_keys=active_keys(keys).get(account.id, 0)),
            "requests": sum(g.requests for g in usage),
            "charged_micro": charged,
            "charged_usd": format_usd(charged),
            "open_reservations": len(holds),
            "held_micro": held,
            "held_usd": format_usd(held),
            "keys": [key_json(k) for k in keys],
        }

    async def topup(self, request: web.Request) -> web.Response:
        idem = request.headers.get("idempotency-key")
        if idem is not None and not 0 < len(idem) <= MAX_IDEMPOTENCY_KEY:
            raise invalid(
                f"The Idempotency-Key header must be 1-{MAX_IDEMPOTENCY_KEY} characters.",
                "Idempotency-Key",
            )
        body = await json_body(request)
        micro = amount_micro(body)
        note = optional_text(body, "note")
        ledger = self._ledger
        account = await _require_account(ledger, request.match_info["account"])
        credit = await ledger.topup(account.id, micro, note, idempotency_key=idem)
        log.info(
            "admin_topup",
            account_id=account.id,
            amount_micro=micro,
            entry_id=credit.entry_id,
            replayed=credit.replayed,
        )
        return ok(
            {
                "object": "topup",
                "account_id": account.id,
                "entry_id": credit.entry_id,
                "amount_micro": credit.amount_micro,
                "amount_usd": format_usd(credit.amount_micro),
                "balance_micro": credit.balance_micro,
                "balance_usd": format_usd(credit.balance_micro),
                "replayed": credit.replayed,
            },
            200 if credit.replayed else 201,
        )

    # -- keys --------------------------------------------------------------------------

    async def account_keys(self, request: web.Request) -> web.Response:
        ledger = self._ledger
        account = await _require_account(ledger, request.match_info["account"])
        keys = await ledger.list_keys(account.id)
        return ok({"object": "list", "data": [key_json(k) for k in keys]})

    async def list_keys(self, request: web.Request) -> web.Response:
        ledger = self._ledger
        account_id = None
        if "account" in request.query:
            account_id = (await _require_account(ledger, request.query["account"])).id
        keys = await ledger.list_keys(account_id)
        return ok({"object": "list", "data": [key_json(k) for k in keys]})

    async def create_key(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        ledger = self._ledger
        account = await _require_account(ledger, request.match_info["account"])
        key, plaintext = await ledger.create_key(
            account.id, label=optional_text(body, "label"), rate_limit=rate_limit(body)
        )
        log.info("admin_key_created", account_id=account.id, key_id=key.key_id)
        [info] = await ledger.list_keys(key_id=key.key_id)
        return ok({**key_json(info), "api_key": plaintext, "shown_once": True}, 201)

    async def show_key(self, request: web.Request) -> web.Response:
        found = await self._ledger.list_keys(key_id=key_id(request))
        if not found:
            raise UnknownKey("no API key with that id")
        return ok(key_json(found[0]))

    async def update_key(self, request: web.Request) -> web.Response:
        kid = key_id(request)
        body = await json_body(request)
        if set(body) != {"rate_limit"}:
            raise invalid("Only 'rate_limit' (an integer, or null for the default) can be set.")
        info = await self._ledger.set_rate_limit(kid, rate_limit(body))
        log.info("admin_key_rate_limit", key_id=kid, rate_limit=info.rate_limit)
        return ok(key_json(info))

    async def revoke_key(self, request: web.Request) -> web.Response:
        kid = key_id(request)
        ledger = self._ledger
        if not await ledger.list_keys(key_id=kid):
            raise UnknownKey("no API key with that id")
        changed = await ledger.revoke_key(kid)
        log.info("admin_key_revoked", key_id=kid, changed=changed)
        [info] = await ledger.list_keys(key_id=kid)
        return ok({**key_json(info), "was_active": changed})

    # -- usage ---------------------------------------------------------------------------

    async def usage(self, request: web.Request) -> web.Response:
        """``teegate usage --json``: per UTC day, account, key and model."""
        q = request.query
        ledger = self._ledger
        account_id = None
        if "account" in q:
            account_id = (await _require_account(ledger, q["account"])).id
        kid = None
        if "key" in q:
            if not q["key"].isdigit() or len(q["key"]) > 18:
                raise invalid("'key' must be a key id.", "key")
            kid = int(q["key"])
        try:
            since = day_start_ms(q.get("since"))
        except ValueError:
            raise invalid("'since' must be a date like 2025-01-31.", "since") from None
        groups = await ledger.usage(
            account_id=account_id, key_id=kid, model=q.get("model"), since_ms=since
        )
        return ok({"object": "list", "data": [usage_json(g) for g in groups]})

    async def timeline(self, request: web.Request) -> web.Response:
        """Requests, tokens and charges per model in time buckets, for live charts.

        ``minutes`` (default 60, at most a week) back from now, ``bucket_s`` (default 60,
        10 to 86400) per point. Every account together: per-account figures are in ``usage``.
        """
        minutes = _int_param(request, "minutes", 60, 1, 7 * 24 * 60)
        bucket_s = _int_param(request, "bucket_s", 60, 10, 86_400)
        now_ms = int(time.time() * 1000)
        buckets = await self._ledger.usage_timeline(
            since_ms=now_ms - minutes * 60_000, bucket_ms=bucket_s * 1000
        )
        return ok(
            {
                "object": "list",
                "bucket_s": bucket_s,
                "now_ms": now_ms,
                "data": [asdict(b) for b in buckets],
            }
        )

    # -- attestation and refusals --------------------------------------------------------

    async def verdicts(self, _request: web.Request) -> web.Response:
        """Per confidential model: served or not, why not, and what was verified."""
        att = self._attestation
        snap = self._catalog.current()
        data = [
            {
                "model": m,
                "served": att.refusal(m) is None,
                "refusal": att.refusal(m),
                "attestation": att.describe(m),
            }
            for m in snap.models
        ]
        return ok({"object": "list", "mode": att.mode, "data": data})

    async def evidence(self, request: web.Request) -> web.Response:
        """One model's cached verdict with the evidence as the upstream sent it."""
        model = request.query.get("model")
        if not model:
            raise invalid(
                "Missing required parameter: 'model'.", "model", "missing_required_parameter"
            )
        snap = self._catalog.current()
        if model not in snap.models:
            raise GatewayError(
                404, "No confidential model with that id in the catalog.", "model_not_found"
            )
        verdict = self._attestation.verdict(model)
        if verdict is None:
            raise GatewayError(
                503, "That model has not been attested yet; retry shortly.", "attestation_pending"
            )
        return ok(self._report.body(model, verdict, None))

    async def refusals(self, request: web.Request) -> web.Response:
        """The newest refusals first: time, code, status, route, model (when listed)."""
        text = request.query.get("limit", "100")
        if not text.isdigit() or not 0 < int(text) <= 10_000:
            raise invalid("'limit' must be between 1 and 10000.", "limit")
        items = self._refusals.newest_first(int(text))
        return ok({"object": "list", "data": [r.as_json() for r in items]})


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise invalid(f"'{name}' must be a whole number from {low} to {high}.", name)
    return int(text)


async def _require_account(ledger: Ledger, ref: str | int) -> Any:
    account = await ledger.account(ref)
    if account is None:
        raise GatewayError(404, "No account with that id or name.", "account_not_found")
    return account
