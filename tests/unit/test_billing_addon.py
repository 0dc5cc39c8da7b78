"""Billing, hook by hook, on mitmproxy test flows over a fake ledger.

The fake sits in a real :class:`LedgerLink` and only records what the addon asked of it
(reserve, settle, release); the arithmetic and durability of those calls are the
ledger's own tests. Expected amounts are worked by hand from the request below, so
a change in the estimate or the fallback shows here as a number, not a tautology.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy import flow as mflow
from mitmproxy.test import taddons, tflow, tutils

from teegate.addons import flowstate
from teegate.addons.billing import Billing
from teegate.addons.flowstate import FailedClosed, Route, Stage
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.schema import ChatRequest
from teegate.addons.streaming import StreamTally
from teegate.catalog.models import CatalogModel, Pricing
from teegate.ledger import ApiKey, InsufficientBalance, LedgerUnavailable, Prices, Reservation

TEE = "deepseek-ai/DeepSeek-V3.2-TEE"
# $1 per 1M input tokens, $2 per 1M output tokens, $0.50 per 1M cached.
PRICES = Prices(input=1_000_000, output=2_000_000, cache_read=500_000)
KEY_ROW = ApiKey(key_id=7, account_id=3, label=None, rate_limit=None)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
# The prompt estimate of BODY, by hand, from its compact JSON
#   {"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":10}
# letters (half a token each): model m messages role user content hi max tokens
#   = 5+1+8+4+4+7+2+3+6 = 40 -> 20 tokens;
# other bytes (one each): 8 quoted strings (16 quotes), 5 colons, 3 commas, { [ { } ] } (6),
#   and _ 1 0 (3) = 33 tokens;
# plus the 64-token template overhead: 64 + 20 + 33 = 117.
PROMPT_ESTIMATE = 117
# Reservation: 117 prompt * $1/M + 10 max_tokens * $2/M = 117 + 20 micro-USD.
RESERVED = 137


class FakeLedger:
    """Records the calls; ``reserve`` returns a handle or raises ``refuse_with``."""

    def __init__(self, refuse_with: Exception | None = None) -> None:
        self.refuse_with = refuse_with
        self.reserved: list[tuple[str, ApiKey, str, Prices, int]] = []
        # ("release", reason) or ("settle", (prompt, completion, cached, source, status))
        self.finished: list[tuple[str, Any]] = []

    async def reserve(
        self, request_id: str, key: ApiKey, model: str, prices: Prices, amount_micro: int
    ) -> Reservation:
        self.reserved.append((request_id, key, model, prices, amount_micro))
        if self.refuse_with is not None:
            raise self.refuse_with
        return Reservation(
            id=1,
            request_id=request_id,
            account_id=key.account_id,
            key_id=key.key_id,
            model=model,
            prices=prices,
            amount_micro=amount_micro,
            created_ms=0,
        )

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        source: str = "usage",
        timing: Any = None,
        *,
        status: str = "ok",
    ) -> int:
        counts = (prompt_tokens, completion_tokens, cached_tokens)
        self.finished.append(("settle", (*counts, source, status)))
        return 0

    async def release(self, reservation: Reservation, reason: str, timing: Any = None) -> None:
        self.finished.append(("release", reason))


def gated_chat(body: dict[str, Any] = BODY, *, route: str = "chat", gate: bool = True) -> Any:
    """A chat completion as it reaches Billing: routed, parsed, keyed, approved by the gate.

    With :func:`later_state`, the only places this module writes other addons' flow state."""
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/v1/chat/completions"))
    flowstate.set_route(f, Route(route))
    flowstate.set_request_id(f, "req_test")
    flowstate.set_chat_request(f, ChatRequest.model_validate(body))
    model = CatalogModel(
        id=TEE,
        created=0,
        owned_by="test",
        context_length=100_000,
        max_output_length=None,
        features=frozenset(),
        input_modalities=("text",),
        output_modalities=("text",),
        pricing=Pricing(input=PRICES.input, output=PRICES.output, cache_read=PRICES.cache_read),
    )
    flowstate.set_catalog_model(f, model)
    flowstate.set_api_key(f, KEY_ROW)
    if gate:
        flowstate.passed(f, Stage.GATE)
    return f


def later_state(
    f: Any,
    *,
    tally: StreamTally | None = None,
    timed_out: bool = False,
    error_code: str | None = None,
) -> None:
    """What the addons after Billing record on the flow: StreamRelay's tally of a stream,
    UpstreamDeadline's timeout, AnswerModelCheck's refusal of an answer for another model."""
    if tally is not None:
        flowstate.set_stream_tally(f, tally)
    if timed_out:
        flowstate.set_timed_out(f)
    if error_code is not None:
        flowstate.set_error_code(f, error_code)


def json_response(doc: Any, status: int = 200) -> Any:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return tutils.tresp(status_code=status, content=body)


async def reserved_flow(billing: Billing, body: dict[str, Any] = BODY):
    f = gated_chat(body)
    await billing.request(f)
    assert f.response is None and flowstate.has_passed(f, Stage.BILLING)
    return f


async def finish(billing: Billing, f: Any, hook: str) -> None:
    getattr(billing, hook)(f)
    await billing.done()  # settlement runs off the response path


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@contextlib.contextmanager
def running(ledger: FakeLedger, unanswered: str = "hold") -> Iterator[Billing]:
    """Billing over the fake, in mitmproxy's test context."""
    addon = Billing(LedgerLink(ledger), unanswered=unanswered)  # type: ignore[arg-type]
    with taddons.context(addon):
        yield addon


@pytest.fixture
def billing(ledger: FakeLedger) -> Iterator[Billing]:
    with running(ledger) as addon:
        yield addon


# --- request: the reservation -------------------------------------------------------


async def test_reserves_the_estimate_at_the_model_prices(ledger, billing):
    await reserved_flow(billing)
    assert ledger.reserved == [("req_test", KEY_ROW, TEE, PRICES, RESERVED)]


async def test_n_choices_reserve_the_budget_of_each():
    ledger = FakeLedger()
    with running(ledger) as billing:
        await reserved_flow(billing, {**BODY, "n": 3})
    # The body grows by ,"n":3 -- 1 letter and 5 other bytes: 41 letters round up to 21
    # tokens, so the prompt is 64 + 21 + 33 + 5 = 123; the output 3 choices * 10 = 30 tokens.
    # 123 * $1/M + 30 * $2/M = 123 + 60 = 183 micro-USD.
    assert ledger.reserved[0][4] == 183


@pytest.mark.parametrize(
    "state",
    [
        pytest.param({"route": "local"}, id="not a chat"),
        pytest.param({"gate": False}, id="gate did not approve"),
        pytest.param({"answered": True}, id="already answered"),
    ],
)
async def test_nothing_is_reserved_for_a_flow_it_does_not_own(ledger, billing, state):
    f = gated_chat(route=state.get("route", "chat"), gate=state.get("gate", True))
    if state.get("answered"):
        f.response = json_response({})
    await billing.request(f)
    assert ledger.reserved == []
    assert not flowstate.has_passed(f, Stage.BILLING)


@pytest.mark.parametrize(
    ("error", "status", "code", "words"),
    [
        (
            InsufficientBalance(balance_micro=100, needed_micro=137),
            402,
            "insufficient_balance",
            "needs up to $0.000137 reserved, and $0.0001 is available",
        ),
        (InsufficientBalance(-5, 137), 402, "insufficient_balance", "and $0.00 is available"),
        (LedgerUnavailable("disk"), 503, "billing_unavailable", "was not sent"),
        (RuntimeError("bug"), 500, "internal_error", "did not forward"),
    ],
)
async def test_a_refused_reservation_answers_locally(error, status, code, words):
    ledger = FakeLedger(refuse_with=error)
    with running(ledger) as billing:
        f = gated_chat()
        await billing.request(f)
    assert f.response.status_code == status
    envelope = json.loads(f.response.content)["error"]
    assert envelope["code"] == code
    assert words in envelope["message"]
    assert not flowstate.has_passed(f, Stage.BILLING)
    # Nothing to settle or release later: no reservation was made.
    billing.response(f)
    await billing.done()
    assert ledger.finished == []


# --- response: the usage table ------------------------------------------------------

# usage as the upstream sent it -> (prompt, completion, cached) settled from usage, or None:
# unusable, so settled from the generated bytes ("hello" = 5 bytes -> ceil(5/3) = 2 tokens)
# and the prompt estimate.
P, C, D = "prompt_tokens", "completion_tokens", "prompt_tokens_details"
USAGE_TABLE = [
    ({P: 20, C: 5}, (20, 5, 0)),
    ({P: 0, C: 0}, (0, 0, 0)),
    ({P: 20, C: 5, D: {"cached_tokens": 8}}, (20, 5, 8)),
    ({P: 20, C: 5, D: {"cached_tokens": 20}}, (20, 5, 20)),
    ({P: 20, C: 5, D: None}, (20, 5, 0)),
    ({P: 20, C: 5, D: {}}, (20, 5, 0)),
    ({P: 20, C: 5, D: [8]}, (20, 5, 0)),
    ({P: 20, C: 5, D: {"cached_tokens": None}}, (20, 5, 0)),
    ({P: 10**30, C: 10**30}, (10**30, 10**30, 0)),
    ({P: True, C: 5}, None),
    ({P: 20, C: False}, None),
    ({P: 20, C: 5, D: {"cached_tokens": True}}, None),
    ({P: -1, C: 5}, None),
    ({P: 20, C: -5}, None),
    ({P: 20, C: 5, D: {"cached_tokens": -1}}, None),
    ({P: 20.0, C: 5}, None),
    ({P: 20, C: 5.5}, None),
    ({P: 20, C: 5, D: {"cached_tokens": 2.0}}, None),
    ({P: "20", C: 5}, None),
    ({P: 20, C: "5"}, None),
    ({P: None, C: 5}, None),
    ({C: 5}, None),
    ({P: 20}, None),
    ({}, None),
    (None, None),
    ([20, 5], None),
    ("20", None),
    ({P: 20, C: 5, D: {"cached_tokens": 21}}, None),
]


@pytest.mark.parametrize(("usage", "expected"), USAGE_TABLE)
async def test_usage_is_charged_only_when_every_count_is_a_sound_integer(
    ledger, billing, usage, expected
):
    f = await reserved_flow(billing)
    answer = {"choices": [{"message": {"role": "assistant", "content": "hello"}}]}
    if usage is not None:
        answer["usage"] = usage
    f.response = json_response(answer)
    await finish(billing, f, "response")
    if expected is None:
        assert ledger.finished == [("settle", (PROMPT_ESTIMATE, 2, 0, "bytes", "ok"))]
    else:
        assert ledger.finished == [("settle", (*expected, "usage", "ok"))]


# --- response: other answers --------------------------------------------------------

# Unreadable: the whole reservation, the prompt estimate and all 10 max_tokens.
WHOLE_HOLD = ("settle", (PROMPT_ESTIMATE, 10, 0, "bytes", "unreadable"))


@pytest.mark.parametrize(
    ("response", "tally", "expected"),
    [
        pytest.param(
            json_response({"error": {"message": "overloaded"}}, 503),
            None,
            ("release", "upstream answered HTTP 503"),
            id="upstream error before any token",
        ),
        pytest.param(
            json_response(b"<html>not json</html>"),
            None,
            WHOLE_HOLD,
            id="unreadable body: the whole hold (completion = max_tokens)",
        ),
        pytest.param(
            json_response(b""),
            StreamTally(usage={"prompt_tokens": 30, "completion_tokens": 4}, generated_bytes=9),
            ("settle", (30, 4, 0, "usage", "ok")),
            id="stream with usage",
        ),
        pytest.param(
            json_response(b""),
            StreamTally(generated_bytes=10),
            ("settle", (PROMPT_ESTIMATE, 4, 0, "bytes", "ok")),  # ceil(10 / 3) = 4
            id="stream without usage: from bytes",
        ),
        pytest.param(
            json_response(b"", 500),
            StreamTally(generated_bytes=10),
            ("settle", (PROMPT_ESTIMATE, 4, 0, "bytes", "ok")),
            id="stream broke off with an error after tokens: from bytes",
        ),
        pytest.param(
            json_response(b""),
            StreamTally(opaque=True, generated_bytes=3),
            WHOLE_HOLD,
            id="opaque stream: the whole hold",
        ),
    ],
)
async def test_a_response_settles_or_releases(ledger, billing, response, tally, expected):
    f = await reserved_flow(billing)
    f.response = response
    later_state(f, tally=tally)
    await finish(billing, f, "response")
    assert ledger.finished == [expected]


async def test_an_answer_for_another_model_is_released(ledger, billing):
    f = await reserved_flow(billing)
    f.response = json_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    later_state(f, error_code="upstream_model_mismatch")
    await finish(billing, f, "response")
    assert ledger.finished == [("release", "the upstream answered for another model")]


# --- error: no response headers -----------------------------------------------------


def held(why: str) -> tuple[str, Any]:
    """The whole reservation charged: the prompt estimate and all 10 max_tokens."""
    return (
        "settle",
        (PROMPT_ESTIMATE, 10, 0, "bytes", f"unanswered ({why}): charged the reservation"),
    )


@pytest.mark.parametrize(
    ("connected", "error", "timed_out", "rule", "expected"),
    [
        (False, "Connection refused", False, "hold", ("release", "never reached the upstream")),
        (False, "Client disconnected.", False, "hold", ("release", "never reached the upstream")),
        (True, "Client disconnected.", False, "hold", held("client disconnected")),
        (True, "peer closed connection: b'secret'", False, "hold", held("connection lost")),
        (True, "Connection killed.", True, "hold", held("upstream timeout")),
        (
            True,
            "Client disconnected.",
            False,
            "release",
            ("release", "unanswered (client disconnected); billing.unanswered = release"),
        ),
    ],
)
async def test_an_unanswered_request_is_held_only_if_it_was_sent(
    connected, error, timed_out, rule, expected
):
    ledger = FakeLedger()
    with running(ledger, unanswered=rule) as billing:
        f = await reserved_flow(billing)
        if not connected:
            f.server_conn.timestamp_tcp_setup = None
        later_state(f, timed_out=timed_out)
        f.error = mflow.Error(error)
        await finish(billing, f, "error")
    assert ledger.finished == [expected]


async def test_a_flow_without_a_reservation_is_left_alone(ledger, billing):
    f = gated_chat()  # never reserved
    f.response = json_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    await finish(billing, f, "response")
    f.error = mflow.Error("Client disconnected.")
    await finish(billing, f, "error")
    assert ledger.finished == []


# --- an answer a response-side addon failed closed on (addons/response_guard.py) ------


def charged(status: str) -> tuple[str, Any]:
    return ("settle", (PROMPT_ESTIMATE, 10, 0, "bytes", status))


@pytest.mark.parametrize(
    ("how", "upstream_status", "rule", "expected"),
    [
        (
            FailedClosed.WITHHELD,
            200,
            "hold",
            charged("withheld after a gateway fault: charged the reservation"),
        ),
        (
            FailedClosed.WITHHELD,
            200,
            "release",
            ("release", "withheld after a gateway fault; billing.unanswered = release"),
        ),
        (
            FailedClosed.WITHHELD,
            429,
            "hold",
            ("release", "upstream answered HTTP 429 (withheld after a gateway fault)"),
        ),
        (
            FailedClosed.CUT,
            200,
            "release",
            charged("cut by a gateway fault: charged the reservation"),
        ),
    ],
)
@pytest.mark.parametrize("hook", ["response", "error"])
async def test_a_failed_closed_answer_is_charged_by_the_unanswered_rule(
    how, upstream_status, rule, expected, hook
):
    """Whatever the 502 envelope or the usage the upstream's answer carried: a withheld answer
    follows ``billing.unanswered``, a cut stream is charged its reservation."""
    ledger = FakeLedger()
    with running(ledger, unanswered=rule) as billing:
        f = await reserved_flow(billing)
        f.response = json_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}, 502)
        later_state(f, tally=StreamTally(usage={"prompt_tokens": 1, "completion_tokens": 1}))
        flowstate.set_failed_closed(f, how, upstream_status)
        if hook == "error":
            f.error = mflow.Error("Client disconnected.")
        await finish(billing, f, hook)
    assert ledger.finished == [expected]


async def test_an_answer_withheld_after_billing_read_it_is_charged_as_withheld(ledger, billing):
    """A later addon's response hook raised after Billing planned from the usage it read."""
    f = await reserved_flow(billing)
    f.response = json_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    billing.response(f)
    flowstate.set_failed_closed(f, FailedClosed.WITHHELD, 200)  # the later addon's guard
    await billing.done()
    assert ledger.finished == [charged("withheld after a gateway fault: charged the reservation")]
