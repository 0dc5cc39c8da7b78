"""AccessLog on mitmproxy test flows: the request id, and the one line it writes per request.

The line is read as structlog hands it to the sink (``capture_logs``); what the sink then
escapes and cuts is teegate/logs.py's concern.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from mitmproxy import flow as mflow
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from teegate.addons import flowstate
from teegate.addons.accesslog import AccessLog, RequestIds
from teegate.addons.flowstate import Route
from teegate.addons.headers import ResponseHeaders

TEE = "deepseek-ai/DeepSeek-V3.2-TEE"
SECRET = "sk-secret-prompt"


def flow(
    *,
    path: bytes = b"/v1/chat/completions",
    content: bytes = b"",
    resp: bool | Any = True,
    error: str | None = None,
    route: str | None = None,
    chat: bool = False,
    listed_model: str | None = None,
    error_code: str | None = None,
    egress: str | None = None,
    mode: str = "reverse:https://up.example",
):
    """A finished flow, and what the earlier addons recorded on it.

    The one place this module writes the other addons' flow state."""
    req = tutils.treq(method=b"POST", path=path, content=content)
    f = tflow.tflow(req=req, resp=resp, err=mflow.Error(error) if error else False)
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    if route is not None:
        flowstate.set_route(f, Route(route))
    if chat:  # parsed: its content is never read here
        flowstate.set_chat_request(f, object())  # type: ignore[arg-type]
    if listed_model is not None:
        flowstate.set_listed_model(f, listed_model)
    if error_code is not None:
        flowstate.set_error_code(f, error_code)
    if egress is not None:
        flowstate.set_egress_verdict(f, egress)
    return f


@pytest.fixture
def access() -> Iterator[AccessLog]:
    addon = AccessLog()
    with taddons.context(addon):
        yield addon


def line(access: AccessLog, f, hook: str = "response") -> dict[str, Any]:
    """The access-log line the hook writes (exactly one)."""
    with structlog.testing.capture_logs() as logs:
        getattr(access, hook)(f)
    assert len(logs) == 1
    return logs[0]


def test_every_request_gets_an_id_in_its_response_and_log_line(access):
    f, g = flow(resp=False), flow(resp=False)
    ids = RequestIds()
    ids.request(f)
    ids.request(g)
    f.response = tutils.tresp()
    ResponseHeaders().response(f)
    rid = f.response.headers["x-request-id"]
    assert re.fullmatch(r"req_[0-9a-f]{24}", rid)
    assert line(access, f)["request_id"] == rid
    g.response = tutils.tresp()
    ResponseHeaders().response(g)
    assert g.response.headers["x-request-id"] != rid


def test_the_line_holds_metadata_only(access):
    f = flow(
        path=b"/v1/chat/completions?api_key=" + SECRET.encode(),
        content=b'{"messages":"' + SECRET.encode() + b'"}',
        route="chat",
        chat=True,
        listed_model=TEE,
    )
    f.response = tutils.tresp(status_code=200, content=b"0123456789")
    entry = line(access, f)
    assert SECRET not in repr(entry)
    total_ms = entry.pop("total_ms")
    assert isinstance(total_ms, float) and total_ms > 0
    assert entry == {
        "event": "request",
        "log_level": "info",
        "request_id": None,  # the request hook never ran for this flow
        "mode": "reverse",
        "host": "address:22",
        "decision": "forwarded",
        "method": "POST",
        "path": "/v1/chat/completions",  # the query string is dropped
        "model": TEE,
        "status": 200,
        "error_code": None,
        "error": None,
        "upstream_ms": 1000.0,  # response start 946681202 - request end 946681201
        "bytes_in": 31,  # '{"messages":"' 13 + 'sk-secret-prompt' 16 + '"}' 2
        "bytes_out": 10,
    }


@pytest.mark.parametrize(
    ("state", "decision"),
    [
        ({"route": "chat"}, "forwarded"),
        ({"route": "local"}, "local"),
        ({"route": "passthrough"}, "passthrough"),
        ({"route": "passthrough", "egress": "audit"}, "audit"),
        ({"route": "chat", "error_code": "insufficient_balance"}, "refused"),
        ({"error_code": "invalid_api_key"}, "refused"),
        ({}, None),
    ],
)
def test_the_decision(access, state, decision):
    assert line(access, flow(**state))["decision"] == decision


@pytest.mark.parametrize(
    ("state", "model"),
    [
        ({"chat": True, "listed_model": TEE}, TEE),
        ({"chat": True}, "unlisted"),  # whatever the client typed is not logged
        ({}, None),  # not a chat completion
        ({"listed_model": TEE}, None),
    ],
)
def test_the_model_only_when_the_catalog_lists_it(access, state, model):
    assert line(access, flow(**state))["model"] == model


@pytest.mark.parametrize(
    ("message", "request_whole", "category"),
    [
        (f"invalid content-length header: b'{SECRET}'", True, "invalid_http"),
        ("Connection refused", True, "upstream_unreachable"),
        ("Client disconnected.", True, "client_disconnected"),
        (f"peer closed connection: b'{SECRET}'", True, "upstream_disconnected"),
        ("peer closed connection", False, "client_disconnected"),
        (f"{SECRET}", True, "other"),
    ],
)
def test_an_error_is_logged_as_its_category_only(access, message, request_whole, category):
    f = flow(resp=False, error=message)
    if not request_whole:
        f.request.timestamp_end = None
    entry = line(access, f, "error")
    assert entry["error"] == category
    assert (entry["status"], entry["bytes_out"], entry["upstream_ms"]) == (None, None, None)
    assert SECRET not in repr(entry)


@pytest.mark.parametrize(
    ("mode", "logged"),
    [
        ("regular", "egress"),
        ("reverse:https://up.example", "reverse"),
    ],
)
def test_the_listener(access, mode, logged):
    assert line(access, flow(mode=mode))["mode"] == logged


def test_a_relayed_stream_counts_the_bytes_its_tally_saw_go_out(access):
    """A streamed body is not kept: bytes_out is what the relay (or the Responses translation
    wrapped around it) sent on, and the error envelope's size once an answer was withheld."""
    from teegate.addons.flowstate import FailedClosed
    from teegate.addons.streaming import StreamTally

    f = flow(route="chat", chat=True, listed_model=TEE)
    f.response = tutils.tresp(status_code=200, content=None)
    tally = StreamTally()
    tally.delivered(b"data: x\n\n")
    flowstate.set_stream_tally(f, tally)
    assert line(access, f)["bytes_out"] == 9
    flowstate.set_failed_closed(f, FailedClosed.WITHHELD, 200)
    entry = line(access, f)  # the guard puts the envelope in place first
    assert f.response.status_code == 502
    assert entry["bytes_out"] == len(f.response.raw_content) > 9
