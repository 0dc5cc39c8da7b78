"""Fail closed on the response path, in a real gateway process through the openai SDK: a
response-side hook or the stream relay that raises (tests/support/faulty_gateway.py,
``response:``) withholds the answer or ends the stream, and the ledger still settles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.billing import MSG, usage_row
from tests.support.clients import chat_count
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.metrics import counted
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE

STREAM_CHAT = {"model": TEE, "messages": MSG, "stream": True}
WITHHELD = "withheld after a gateway fault: charged the reservation"
CUT = "cut by a gateway fault: charged the reservation"


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault") / "switch"


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc, switch: Path) -> Iterator[GatewayProc]:
    """The one faulty gateway of this module: which hook raises is read from ``switch``."""
    env = {"TEEGATE_FAULT": f"response:{switch}"}
    with start_gateway(upstream.base_url, module="tests.support.faulty_gateway", env=env) as gw:
        yield gw


@pytest.fixture
def fault(switch: Path) -> Iterator[Path]:
    switch.write_text("")
    yield switch
    switch.write_text("")


@pytest.fixture(scope="module")
def answer(gateway: GatewayProc) -> str:
    """What the sandbox answers, with no fault: the text that must never be relayed."""
    with openai.OpenAI(base_url=gateway.api_base, api_key=gateway.api_key, max_retries=0) as c:
        text = c.chat.completions.create(model=TEE, messages=MSG).choices[0].message.content
    assert text
    return text


def assert_withheld(exc: openai.APIStatusError, answer: str) -> str:
    assert exc.status_code == 502
    assert exc.response.headers["x-should-retry"] == "false"
    assert exc.body["code"] == "internal_error"
    assert answer not in exc.response.text
    assert "x-teegate-receipt" not in exc.response.headers  # no receipt for a withheld answer
    return exc.response.headers["x-request-id"]


def assert_charged(gateway: GatewayProc, request_id: str, status: str) -> None:
    row = usage_row(gateway.db, request_id)
    assert row["state"] == "settled" and row["status"] == status, row
    assert row["charge_micro"] == row["reserved_micro"] > 0


def assert_logged_without_content(gateway: GatewayProc, hook: str, answer: str) -> None:
    log = gateway.log_text()
    assert '"addon_failed_closed"' in log and f'"hook": "{hook}"' in log, log[-2000:]
    assert "InjectedFault" in log and answer not in log


def requests_counted(gateway: GatewayProc, **labels: str) -> float:
    """``teegate_requests_total`` summed over the samples carrying ``labels``."""
    return counted(gateway, "teegate_requests_total", **labels)


def assert_recorded_as_sent(
    gateway: GatewayProc, exc: openai.APIStatusError, route: str, before: float
) -> None:
    """The access log and the metrics say what the client got (the 502 envelope), not the
    upstream's 200 that a later hook withheld."""
    line = gateway.access_line(exc.response.headers["x-request-id"])
    got = (line["status"], line["error_code"], line["decision"], line["bytes_out"])
    assert got == (502, "internal_error", "refused", len(exc.response.content)), line
    counted = dict(route=route, status="502", code="internal_error")
    assert requests_counted(gateway, **counted) == before + 1


# Hooks that run before the access log and the metrics, and hooks that ran after them
# (Billing.response, ResponseHeaders.response, ...) before they were moved to the end.
@pytest.mark.parametrize(
    "hook",
    [
        "AnswerModelCheck.response",
        "Billing.responseheaders",
        "ResponseHeaders.response",
        "Billing.response",
        "UpstreamDeadline.response",
        "ReleaseLargeBodies.response",
        "ReceiptIssuer.response",  # the last before the metrics and the log
    ],
)
def test_a_plain_answer_whose_hook_raised_is_withheld(
    gateway, upstream, client, fault, answer, hook
):
    chat = "/v1/chat/completions"
    before = requests_counted(gateway, route=chat, status="502", code="internal_error")
    # Its promised receipt: withdrawn, as the id never left with the envelope (the issuer's
    # own fault is its reason); never counted lost.
    issuer = hook == "ReceiptIssuer.response"
    ended = dict(outcome="withdrawn") | (dict(reason="issuer_fault") if issuer else {})
    lost = counted(gateway, "teegate_receipts_total", outcome="lost")
    promised = counted(gateway, "teegate_receipts_total", **ended)
    fault.write_text(hook)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model=TEE, messages=MSG)
    rid = assert_withheld(exc.value, answer)
    assert chat_count(upstream) == 1
    if hook != "Billing.response":  # its own fault leaves the reservation to the recovery rule
        assert_charged(gateway, rid, WITHHELD)
    assert_logged_without_content(gateway, hook.split(".")[1], answer)
    assert_recorded_as_sent(gateway, exc.value, chat, before)
    assert counted(gateway, "teegate_receipts_total", **ended) == promised + 1
    assert counted(gateway, "teegate_receipts_total", outcome="lost") == lost


@pytest.mark.parametrize(
    "hook", ["StreamRelay.responseheaders", "ResponseHeaders.responseheaders"]
)  # before and after the relay was set up (the log must not count its bytes then)
def test_a_stream_whose_headers_hook_raised_is_a_502(
    gateway, upstream, client, fault, answer, hook
):
    chat = "/v1/chat/completions"
    before = requests_counted(gateway, route=chat, status="502", code="internal_error")
    fault.write_text(hook)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model=TEE, messages=MSG, stream=True)
    rid = assert_withheld(exc.value, answer)
    assert_charged(gateway, rid, WITHHELD)
    assert_recorded_as_sent(gateway, exc.value, chat, before)


def test_a_stream_whose_relay_raised_ends_with_an_error_event(
    gateway, upstream, client, http, fault
):
    cut = dict(outcome="incomplete", reason="gateway_error")
    before = counted(gateway, "teegate_receipts_total", **cut)
    upstream.behaviour(hold_after_chunks=1)
    stream = client.chat.completions.create(model=TEE, messages=MSG, stream=True)
    rid = stream.response.headers["x-request-id"]
    it = iter(stream)
    first, second = next(it), next(it)  # relayed before the fault
    got = (first.choices[0].delta.content or "") + (second.choices[0].delta.content or "")
    assert got
    fault.write_text("_Relay.__call__")
    upstream.release()
    with pytest.raises(openai.APIError) as exc:
        for _ in it:
            pytest.fail("a chunk after the fault was relayed")
    assert "internal error" in exc.value.message
    assert_charged(gateway, rid, CUT)
    assert_logged_without_content(gateway, "stream", got)
    # Its receipt id went out with the headers: it resolves to what happened.
    doc = http.get(f"/v1/receipts/{stream.response.headers['x-teegate-receipt']}").json()
    r = doc["receipt"]
    assert (r["outcome"], r["incomplete"]["reason"]) == ("incomplete", "gateway_error")
    assert r["response_sha256"] is None and r["relayed_bytes"] > 0
    assert counted(gateway, "teegate_receipts_total", **cut) == before + 1


def test_a_receipt_the_issuer_failed_on_answers_404_at_once(gateway, upstream, http, fault):
    """The stream was relayed whole (its id with it), then the issuer raised: the promise is
    released as the flow ends (``receipt_lost``), so the id answers 404 without the wait."""
    lost = dict(outcome="lost", reason="issuer_fault")
    before = counted(gateway, "teegate_receipts_total", **lost)
    fault.write_text("ReceiptIssuer.response")
    with http.stream("POST", "/v1/chat/completions", json=STREAM_CHAT) as resp:
        body = resp.read()
    assert resp.status_code == 200 and b"[DONE]" in body
    rid, receipt_id = resp.headers["x-request-id"], resp.headers["x-teegate-receipt"]
    gateway.access_line(rid, event="receipt_lost")  # the promise is gone: nothing to wait for
    fault.write_text("")  # the issuer's fault would withhold the receipt endpoint's answer too
    answer = http.get(f"/v1/receipts/{receipt_id}")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "receipt_not_found"
    assert counted(gateway, "teegate_receipts_total", **lost) == before + 1


def test_a_responses_answer_whose_translation_raised_is_withheld(
    gateway, upstream, client, fault, answer
):
    before = requests_counted(gateway, route="/v1/responses", status="502", code="internal_error")
    fault.write_text("ResponsesOut.response")
    with pytest.raises(openai.APIStatusError) as exc:
        client.responses.create(model=TEE, input="Say hello")
    rid = assert_withheld(exc.value, answer)
    assert_charged(gateway, rid, WITHHELD)
    assert_recorded_as_sent(gateway, exc.value, "/v1/responses", before)
