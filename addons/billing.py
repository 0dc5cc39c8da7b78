"""Prepaid billing: reserve before the upstream call, settle from what was served.

Request: with a ledger that shares rate limits (PostgreSQL), the request is
first counted in its key's window in the same database call as the
reservation (:mod:`teegate.addons.ratelimit`): 429 still comes before 402.
Then a conservative estimate (prompt estimate at the input price plus the
whole output budget at the output price) is reserved atomically against the
key's balance and committed before the request may leave; a balance that
cannot cover it gets ``402 insufficient_balance`` and nothing goes upstream.

Response: settle from the upstream's ``usage`` at the prices captured at
reservation; without usage (upstream omitted it, dropped the stream, or the
client left), from the bytes of generated text, converted by
:func:`teegate.ledger.tokens_from_bytes`. Usage priced above the reservation is
charged only up to the account's balance, the rest recorded as unrecovered
(:mod:`teegate.ledger.ledger`, "Settlement policy"): no balance goes below zero.

No response headers (the error hook without ``flow.response``):

* the request never reached the upstream -- mitmproxy gives the flow its
  server connection only once that connection (TCP, and TLS if any) is
  established, and writes the request to it at once, so a flow whose
  ``server_conn`` was never set up (connection refused, unreachable, TLS
  failure, client gone while connecting) -- is released;
* otherwise the request was sent and may have run (the client disconnected,
  or :mod:`teegate.addons.deadline` gave up with 504): with ``billing.unanswered =
  "hold"`` (the default) it is settled at its full reservation, the rule
  crash recovery applies; with ``"release"`` it is released.

An upstream that answered with an HTTP error before any token is released.

An answer a response-side addon failed closed on (:mod:`teegate.addons.response_guard`)
is withheld from the client or cut short; it is charged as :func:`_failed_closed` says: an
answer withheld whole follows ``billing.unanswered``, a stream cut after part of it was
relayed is charged its reservation. If this addon's own ``response`` or ``error`` hook
raises, the reservation stays open and the ledger's recovery rule charges it in full.
Settling runs off the response path; it is idempotent, so a response and an
error hook for one flow cannot charge twice. A crash in between is covered by
the ledger's recovery rule (the reservation is charged).

Why this module is long: reserve, settle and release are one contract (a reservation ends
exactly once, however the flow ends: answered, streamed, refused, failed closed, errored or
abandoned), and each ending's plan reads state the others wrote; split across modules that
one-ending rule would be harder to check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import structlog
from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, billing_unavailable, guarded, refuse
from teegate.addons.flowstate import Stage
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.ratelimit import enforce
from teegate.addons.response_guard import guarded_response
from teegate.addons.streaming import generated_bytes
from teegate.ledger import (
    InsufficientBalance,
    LedgerError,
    Prices,
    RateLimited,
    Reservation,
    Timing,
    estimate_prompt_tokens,
    reservation_micro,
    tokens_from_bytes,
)
from teegate.money import format_usd

if TYPE_CHECKING:
    from teegate.addons.metrics import Meter

log = structlog.get_logger("teegate.billing")


def _ms() -> int:
    return int(time.time() * 1000)


Unanswered = Literal["hold", "release"]


@dataclass(frozen=True, slots=True)
class Release:
    """Hand the whole hold back; ``reason`` is a fixed text, never client bytes."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Settle:
    """Charge these token counts at the reservation's prices."""

    prompt: int
    completion: int
    cached: int
    source: Literal["usage", "bytes"]
    status: str


Plan = Release | Settle


class Billing:
    def __init__(
        self, link: LedgerLink, *, unanswered: Unanswered, meter: Meter | None = None
    ) -> None:
        self._link = link
        self._unanswered: Unanswered = unanswered
        self._meter = meter
        self._pending: set[asyncio.Task[None]] = set()

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if not flowstate.is_chat(flow) or not flowstate.has_passed(flow, Stage.GATE):
            return
        req = flowstate.chat_request(flow)
        model = flowstate.catalog_model(flow)
        p = model.pricing
        prices = Prices(input=p.input, output=p.output, cache_read=p.cache_read)
        body = req.model_dump(mode="json", exclude_unset=True)
        amount = reservation_micro(prices, body, req.output_budget)
        flowstate.set_started_ms(flow, _ms())
        rid = flowstate.need(flowstate.request_id(flow), "request id")
        key = flowstate.need(flowstate.api_key(flow), "api key")
        limit = flowstate.shared_limit(flow)  # set by RateLimit when the ledger counts it
        waited = time.perf_counter()
        try:
            res = await self._link.get().reserve(
                rid, key, model.id, prices, amount, **({"rate_limit": limit} if limit else {})
            )
            if self._meter is not None:
                self._meter.commit_wait(time.perf_counter() - waited)
        except RateLimited as e:
            flowstate.set_rate_counted(flow)
            enforce(flow, e.limit, e.count, e.started_ms / 1000, time.time())  # 429
            return
        except InsufficientBalance as e:
            window = getattr(e, "rate_window", None)
            if limit is not None and window is not None:
                flowstate.set_rate_counted(flow)
                enforce(flow, limit, window[0], window[1] / 1000, time.time())
            refuse(
                flow,
                GatewayError(
                    402,
                    f"Insufficient balance: this request needs up to ${format_usd(e.needed_micro)} "
                    f"reserved, and ${format_usd(max(e.balance_micro, 0))} is available. "
                    "Top up the account or lower max_tokens.",
                    "insufficient_balance",
                    type="insufficient_quota",
                ),
            )
            return
        except LedgerError:
            refuse(flow, billing_unavailable())
            return
        if limit is not None:
            window = flowstate.need(res.rate_window, "shared rate-limit window")
            flowstate.set_rate_counted(flow)
            if not enforce(flow, limit, window[0], window[1] / 1000, time.time()):
                return  # pragma: no cover - the database refuses over the limit
            flowstate.passed(flow, Stage.RATELIMIT)
        flowstate.set_reservation(flow, res)
        flowstate.passed(flow, Stage.BILLING)

    @guarded_response
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flowstate.reservation(flow) is not None:
            flowstate.set_first_byte_ms(flow, _ms())

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        self._close(flow, complete=True)

    @guarded_response
    def error(self, flow: http.HTTPFlow) -> None:
        self._close(flow, complete=False)

    def _close(self, flow: http.HTTPFlow, *, complete: bool) -> None:
        """Settle or release the flow's reservation, however the flow ended.

        The plan is made now, from the chat answer (:class:`~teegate.addons.responses.
        ResponsesOut` translates it later in the chain), and looked at again in the settling
        task once the rest of the chain ran: an answer a later addon withheld
        (:mod:`teegate.addons.response_guard`) is charged as withheld."""
        res = flowstate.reservation(flow)
        if res is None:
            return
        plan = self._plan(flow, res, complete)
        if flowstate.failed_closed(flow) is None:
            self._spawn(flow, res, lambda: self._plan_after_chain(flow, res, plan))
        else:
            self._spawn(flow, res, lambda: plan)

    def _plan(self, flow: http.HTTPFlow, res: Reservation, complete: bool) -> Plan:
        try:
            return _settlement(flow, res, complete=complete, unanswered=self._unanswered)
        except Exception as e:  # the flow must still be charged: fall back to the whole hold
            log.error("settlement_plan_failed", error=type(e).__name__, request_id=res.request_id)
            return _full_hold(flow, res)

    def _plan_after_chain(self, flow: http.HTTPFlow, res: Reservation, plan: Plan) -> Plan:
        """``plan``, unless an addon after this one failed the flow closed."""
        failed = flowstate.failed_closed(flow)
        if failed is None:
            return plan
        return _failed_closed(flow, res, failed, self._unanswered)

    async def done(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _spawn(self, flow: http.HTTPFlow, res: Reservation, plan: Callable[[], Plan]) -> None:
        started = flowstate.started_ms(flow)
        timing = Timing(
            start_ms=res.created_ms if started is None else started,
            first_byte_ms=flowstate.first_byte_ms(flow),
            end_ms=_ms(),
        )
        task = asyncio.ensure_future(self._finish(res, plan, timing))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _finish(
        self, res: Reservation, make_plan: Callable[[], Plan], timing: Timing
    ) -> None:
        # mitmproxy starts tasks eagerly (up to their first await): yield once, so the plan is
        # final only after the rest of this hook chain ran (see :meth:`_close`).
        await asyncio.sleep(0)
        ledger = self._link.get()
        try:
            plan = make_plan()
            match plan:
                case Release(reason=reason):
                    await ledger.release(res, reason, timing)
                case Settle():
                    price = await ledger.settle(
                        res,
                        prompt_tokens=plan.prompt,
                        completion_tokens=plan.completion,
                        cached_tokens=plan.cached,
                        source=plan.source,
                        timing=timing,
                        status=plan.status,
                    )
                    charge: int | None = price
                    if price > res.amount_micro:
                        # The commit takes the extra only up to the balance: ask what it took
                        # (rare: usage priced above the reservation).
                        charge = await ledger.charge_taken(res)
                    if self._meter is not None:
                        self._meter.charge(res.model, plan.prompt, plan.completion, charge or 0)
                    log.info(
                        "charged",
                        request_id=res.request_id,
                        model=res.model,
                        source=plan.source,
                        prompt_tokens=plan.prompt,
                        completion_tokens=plan.completion,
                        cached_tokens=plan.cached,
                        charge_micro=charge,  # taken from the balance (None: not recorded)
                        price_micro=price,  # the usage at the reservation's prices
                        reserved_micro=res.amount_micro,
                    )
        except Exception as e:
            # The reservation stays open; the ledger's recovery rule charges it in full.
            log.error("settlement_failed", request_id=res.request_id, error=type(e).__name__)


def _settlement(
    flow: http.HTTPFlow, res: Reservation, *, complete: bool, unanswered: Unanswered = "hold"
) -> Plan:
    """What to charge for a finished (or broken-off) flow."""
    resp = flow.response
    tally = flowstate.stream_tally(flow)
    status = "ok" if complete else "aborted"
    if flowstate.error_code(flow) == "upstream_model_mismatch":
        return Release("the upstream answered for another model")
    failed = flowstate.failed_closed(flow)
    if failed is not None:
        return _failed_closed(flow, res, failed, unanswered)
    if resp is None:
        return _unanswered(flow, res, unanswered)
    if resp.status_code >= 400 and (tally is None or tally.generated_bytes == 0):
        return Release(f"upstream answered HTTP {resp.status_code}")
    if tally is not None:
        if tally.opaque:
            return _full_hold(flow, res)
        usage = _usage(tally.usage)
        if usage is not None:
            return _from_usage(usage, status)
        return _from_bytes(flow, tally.generated_bytes, status)
    # A complete JSON answer (not streamed).
    try:
        doc = resp.json()
    except ValueError:
        return _full_hold(flow, res)
    usage = _usage(doc.get("usage")) if isinstance(doc, dict) else None
    if usage is not None:
        return _from_usage(usage, status)
    choices = doc.get("choices") if isinstance(doc, dict) else None
    messages = [{"delta": c.get("message")} for c in choices or () if isinstance(c, dict)]
    return _from_bytes(flow, generated_bytes(messages), status)


def _sent(flow: http.HTTPFlow) -> bool:
    """Whether the request went upstream (see the module docstring for why this tells)."""
    return flow.server_conn is not None and flow.server_conn.timestamp_tcp_setup is not None


def _unanswered(flow: http.HTTPFlow, res: Reservation, rule: Unanswered) -> Plan:
    """No response headers: release unless the request was sent and the rule is "hold"."""
    if not _sent(flow):
        return Release("never reached the upstream")
    # A fixed text, never flow.error.msg: that may quote bytes the client sent.
    if flowstate.timed_out(flow):
        why = "upstream timeout"
    elif flow.error is not None and flow.error.msg == "Client disconnected.":
        why = "client disconnected"
    else:
        why = "connection lost"
    if rule == "release":
        return Release(f"unanswered ({why}); billing.unanswered = release")
    return replace(_full_hold(flow, res), status=f"unanswered ({why}): charged the reservation")


def _failed_closed(
    flow: http.HTTPFlow,
    res: Reservation,
    failed: tuple[flowstate.FailedClosed, int | None],
    rule: Unanswered,
) -> Plan:
    """A response-side addon raised (addons/response_guard.py): the answer was withheld or cut.

    The upstream ran the request, so it is not released for free: withheld whole, it is the
    unanswered case (``billing.unanswered``: charged the reservation, or released), unless the
    upstream had answered with an HTTP error, which is released as it would have been. Cut
    after part of a stream was relayed, the tally is no longer complete: charged the
    reservation whatever the rule, like a stream that could not be read.
    """
    how, status = failed
    if how == flowstate.FailedClosed.CUT:
        cut = "cut by a gateway fault: charged the reservation"
        return replace(_full_hold(flow, res), status=cut)
    if status is not None and status >= 400:
        return Release(f"upstream answered HTTP {status} (withheld after a gateway fault)")
    if rule == "release":
        return Release("withheld after a gateway fault; billing.unanswered = release")
    return replace(
        _full_hold(flow, res), status="withheld after a gateway fault: charged the reservation"
    )


def _usage(usage: Any) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) from an OpenAI usage block, or None if unusable."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    counts = (prompt, completion, cached or 0)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        return None
    if counts[2] > counts[0]:
        return None
    return counts


def _prompt_estimate(flow: http.HTTPFlow) -> int:
    req = flowstate.chat_request(flow)
    return estimate_prompt_tokens(req.model_dump(mode="json", exclude_unset=True))


def _from_usage(usage: tuple[int, int, int], status: str) -> Settle:
    prompt, completion, cached = usage
    return Settle(
        prompt=prompt, completion=completion, cached=cached, source="usage", status=status
    )


def _from_bytes(flow: http.HTTPFlow, n_bytes: int, status: str) -> Settle:
    return Settle(
        prompt=_prompt_estimate(flow),
        completion=tokens_from_bytes(n_bytes),
        cached=0,
        source="bytes",
        status=status,
    )


def _full_hold(flow: http.HTTPFlow, res: Reservation) -> Settle:
    """We could not read what was served: charge what was reserved (its upper bound)."""
    req = flowstate.chat_request(flow)
    return Settle(
        prompt=_prompt_estimate(flow),
        completion=req.output_budget,
        cached=0,
        source="bytes",
        status="unreadable",
    )
