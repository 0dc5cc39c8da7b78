"""flowstate: the one owner of the per-flow keys (typed accessors on mitmproxy's tflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mitmproxy.test import tflow, tutils

from teegate.addons import flowstate
from teegate.addons.flowstate import MissingState, Route, Stage
from teegate.addons.seal import Seal
from teegate.catalog.models import CatalogModel
from teegate.ledger import ApiKey
from teegate.runner import REQUIRED_STAGES

ADDONS = Path(flowstate.__file__).parent


def _flow(response: bool = False):
    req = tutils.treq(method=b"POST", path=b"/v1/chat/completions")
    return tflow.tflow(req=req, resp=tutils.tresp() if response else False)


def test_seal_requires_every_stage_of_the_request_path():
    assert set(REQUIRED_STAGES) == {
        "auth",
        "ratelimit",
        "validate",
        "gate",
        "attestation",
        "billing",
        "upstream",
    }


@pytest.mark.parametrize("typo", ["gaet", "Gate", "gate ", "", "stages", "teegate.gate"])
def test_a_misspelt_stage_cannot_be_passed_nor_required(typo):
    flow = _flow()
    with pytest.raises(ValueError):
        flowstate.passed(flow, typo)
    with pytest.raises(ValueError):
        flowstate.has_passed(flow, typo)
    with pytest.raises(ValueError):
        Seal((Stage.GATE, typo))
    assert flowstate.approvals(flow) == frozenset()


def test_approvals_are_what_was_passed():
    flow = _flow()
    flowstate.passed(flow, Stage.AUTH)
    flowstate.passed(flow, "gate")  # a stage's name is accepted, as the enum member
    flowstate.passed(flow, Stage.AUTH)
    assert flowstate.approvals(flow) == {Stage.AUTH, Stage.GATE}
    assert flowstate.has_passed(flow, Stage.GATE) and not flowstate.has_passed(flow, Stage.BILLING)


@pytest.mark.parametrize(
    ("route", "answered", "expected"),
    [
        (Route.CHAT, False, True),
        (Route.CHAT, True, False),  # answered locally (a refusal): no longer on its way
        (Route.LOCAL, False, False),
        (Route.PASSTHROUGH, False, False),
        (None, False, False),  # not routed yet
    ],
)
def test_is_chat(route, answered, expected):
    flow = _flow(response=answered)
    if route is not None:
        flowstate.set_route(flow, route)
    assert flowstate.is_chat(flow) is expected


def test_set_route_refuses_a_name_that_is_no_route():
    with pytest.raises(ValueError):
        flowstate.set_route(_flow(), "chats")


KEY = ApiKey(key_id=1, account_id=2, label=None, rate_limit=None)
MODEL = CatalogModel.model_construct(id="org/model-TEE")
TIMER = object()  # an asyncio.TimerHandle in the deadline addon: only its identity matters
RESPONSE = tutils.tresp()

# (getter, setter, value, what the getter answers before anything was set)
SLOTS = [
    (flowstate.route, flowstate.set_route, Route.LOCAL, None),
    (flowstate.request_id, flowstate.set_request_id, "req_1", None),
    (flowstate.error_code, flowstate.set_error_code, "internal_error", None),
    (flowstate.api_key, flowstate.set_api_key, KEY, None),
    (flowstate.listed_model, flowstate.set_listed_model, "org/model-TEE", None),
    (flowstate.upstream_model, flowstate.set_upstream_model, "org/model-TEE", None),
    (flowstate.client_wants_usage, flowstate.set_client_wants_usage, True, False),
    (flowstate.reservation, flowstate.set_reservation, object(), None),
    (flowstate.started_ms, flowstate.set_started_ms, 1_700_000_000_000, None),
    (flowstate.first_byte_ms, flowstate.set_first_byte_ms, 1_700_000_000_120, None),
    (flowstate.stream_tally, flowstate.set_stream_tally, object(), None),
    (flowstate.egress_verdict, flowstate.set_egress_verdict, "audit", None),
    (flowstate.headers_written, flowstate.set_headers_written, RESPONSE, None),
    (flowstate.pop_deadline, flowstate.set_deadline, TIMER, None),
    (flowstate.responses_call, flowstate.set_responses_call, object(), None),
]


@pytest.mark.parametrize(
    ("get", "put", "value", "unset"), SLOTS, ids=lambda s: getattr(s, "__name__", None)
)
def test_an_accessor_reads_back_what_its_setter_wrote(get, put, value, unset):
    flow = _flow()
    assert get(flow) == unset
    put(flow, value)
    assert get(flow) is value


@pytest.mark.parametrize(
    ("get", "put", "value"),
    [
        (flowstate.chat_request, flowstate.set_chat_request, object()),
        (flowstate.catalog_model, flowstate.set_catalog_model, MODEL),
    ],
)
def test_what_an_earlier_stage_must_have_recorded_is_required(get, put, value):
    flow = _flow()
    with pytest.raises(MissingState):
        get(flow)
    put(flow, value)
    assert get(flow) is value


def test_need():
    assert flowstate.need(0, "count") == 0  # only None is missing
    with pytest.raises(MissingState, match="no api key recorded"):
        flowstate.need(None, "api key")


def test_flags_and_the_header_bag():
    flow = _flow()
    assert not flowstate.timed_out(flow) and not flowstate.has_chat_request(flow)
    flowstate.set_timed_out(flow)
    flowstate.set_chat_request(flow, object())
    assert flowstate.timed_out(flow) and flowstate.has_chat_request(flow)
    flowstate.response_headers(flow).update({"x-a": "1"})
    flowstate.response_headers(flow).update({"x-b": "2"})
    assert flowstate.response_headers(flow) == {"x-a": "1", "x-b": "2"}
    assert flowstate.pop_deadline(flow) is None  # popping twice is harmless


def test_no_two_accessors_share_a_key():
    flow = _flow()
    for _, put, value, _ in SLOTS:
        put(flow, value)
    flowstate.set_chat_request(flow, object())
    flowstate.set_catalog_model(flow, MODEL)
    flowstate.set_timed_out(flow)
    flowstate.response_headers(flow)
    flowstate.passed(flow, Stage.AUTH)
    assert len(flow.metadata) == len(SLOTS) + 5


@pytest.mark.parametrize("path", sorted(ADDONS.glob("*.py")), ids=lambda p: p.name)
def test_only_flowstate_touches_flow_metadata(path):
    if path.name == "flowstate.py":
        return
    assert ".metadata" not in path.read_text("utf-8")
