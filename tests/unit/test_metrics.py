"""Metric labels carry catalog ids and fixed words only; the recent-refusals buffer is bounded.

On mitmproxy test flows and a fresh :class:`Meter` (its own registry) per test, read back
with prometheus_client's own parser.
"""

from __future__ import annotations

import pytest
from mitmproxy import flow as mflow
from mitmproxy.test import tflow, tutils
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from teegate.addons import flowstate
from teegate.addons.flowstate import Route
from teegate.addons.metrics import (
    MAX_LABEL,
    Meter,
    RecentRefusals,
    Refusal,
    RequestMetrics,
    model_label,
    route_label,
)
from teegate.addons.responses_api import ResponsesCall

TEE = "deepseek-ai/DeepSeek-V3.2-TEE"
KNOWN = frozenset({TEE, "deepseek-ai/DeepSeek-V3"})
SECRET = "sk-secret prompt text"


@pytest.mark.parametrize(
    ("model", "label"),
    [
        (TEE, TEE),
        ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3"),  # listed, not confidential
        (SECRET, "other"),
        ("", "other"),
        (TEE.lower(), "other"),  # exact ids only
        (None, "none"),
    ],
)
def test_model_labels_are_catalog_ids_or_other(model, label):
    assert model_label(model, KNOWN) == label


def test_an_odd_catalog_id_is_not_a_label_either():
    odd = "x" * (MAX_LABEL + 1)
    assert model_label(odd, {odd}) == "other"
    assert model_label("a\nb", {"a\nb"}) == "other"


@pytest.mark.parametrize(
    ("path", "label"),
    [
        (b"/v1/chat/completions", "/v1/chat/completions"),
        (b"/v1/models", "/v1/models"),
        (b"/v1/models/" + SECRET.replace(" ", "%20").encode(), "/v1/models/{id}"),
        (b"/v1/account?x=1", "/v1/account"),
        (b"/v1/attestation/report?model=m", "/v1/attestation/report"),
        (b"/" + SECRET.replace(" ", "-").encode(), "other"),
    ],
)
def test_routes_are_a_fixed_list(path, label):
    f = tflow.tflow(req=tutils.treq(path=path))
    assert route_label(f) == label


def _flow(*, model: str | None, code: str | None = None, status: int = 200, error=None):
    f = tflow.tflow(
        req=tutils.treq(method=b"POST", path=b"/v1/chat/completions"),
        resp=tutils.tresp(status_code=status) if error is None else False,
        err=mflow.Error(error) if error else False,
    )
    flowstate.set_route(f, Route.CHAT if code is None else Route.LOCAL)
    flowstate.set_chat_request(f, object())  # type: ignore[arg-type]
    if model is not None:
        flowstate.set_listed_model(f, model)
    if code is not None:
        flowstate.set_error_code(f, code)
    return f


def _samples(meter: Meter) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(meter.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_a_refusal_of_an_unlisted_model_is_counted_as_other_and_kept_without_text():
    meter, refusals = Meter(lambda: KNOWN), RecentRefusals(3)
    addon = RequestMetrics(meter, refusals)
    f = _flow(model=None, code="model_not_confidential", status=400)
    f.request.content = SECRET.encode()
    addon.response(f)
    addon.error(f)  # a response and an error hook for one flow: counted once
    labels = frozenset(
        {
            ("route", "/v1/chat/completions"),
            ("model", "other"),
            ("status", "400"),
            ("decision", "refused"),
            ("code", "model_not_confidential"),
        }
    )
    assert _samples(meter)[("teegate_requests_total", labels)] == 1
    [r] = refusals.newest_first()
    assert (r.code, r.status, r.model) == ("model_not_confidential", 400, "other")
    assert SECRET not in generate_latest(meter.registry).decode()


def test_a_forwarded_chat_is_timed_and_its_charge_counted():
    meter = Meter(lambda: KNOWN)
    addon = RequestMetrics(meter, RecentRefusals())
    f = _flow(model=TEE)
    f.request.timestamp_end = f.response.timestamp_start - 0.25
    addon.response(f)
    meter.charge(TEE, 10, 20, 30)
    meter.charge(SECRET, 1, 1, 1)  # cannot happen (a reservation names a catalog id): "other"
    s = _samples(meter)
    assert s[("teegate_upstream_latency_seconds_count", frozenset({("model", TEE)}))] == 1
    assert s[("teegate_upstream_latency_seconds_sum", frozenset({("model", TEE)}))] == 0.25
    assert s[("teegate_tokens_total", frozenset({("model", TEE), ("direction", "out")}))] == 20
    assert s[("teegate_charged_micro_usd_total", frozenset({("model", TEE)}))] == 30
    assert s[("teegate_charged_micro_usd_total", frozenset({("model", "other")}))] == 1


def test_receipts_are_counted_by_outcome_and_reason_from_fixed_sets():
    meter = Meter(lambda: KNOWN)
    meter.receipt("complete")
    meter.receipt("incomplete", "client_disconnected")
    meter.receipt("lost", "issuer_fault")
    meter.receipt(SECRET, SECRET)  # cannot happen (the callers pass constants): "other"
    s = _samples(meter)

    def n(outcome: str, reason: str = "") -> float:
        return s[("teegate_receipts_total", frozenset({("outcome", outcome), ("reason", reason)}))]

    assert n("complete") == n("incomplete", "client_disconnected") == n("lost", "issuer_fault") == 1
    assert n("other", "other") == 1
    assert SECRET not in generate_latest(meter.registry).decode()


def test_a_failing_catalog_lookup_labels_other_rather_than_failing():
    def broken():
        raise RuntimeError("no catalog")

    assert Meter(broken).model(TEE) == "other"


def test_recent_refusals_keep_only_the_newest():
    buf = RecentRefusals(2)
    for i in range(5):
        buf.add(Refusal(at=float(i), code=f"c{i}", status=400, route="other", model="none"))
    assert [r.code for r in buf.newest_first()] == ["c4", "c3"]
    assert buf.newest_first(1)[0].as_json()["time"] == "1970-01-01T00:00:04Z"


def test_a_responses_call_is_labelled_responses_after_its_path_became_chat():
    f = tflow.tflow(req=tutils.treq(path=b"/v1/chat/completions"))
    flowstate.set_responses_call(f, ResponsesCall(echo={}))
    assert route_label(f) == "/v1/responses"
