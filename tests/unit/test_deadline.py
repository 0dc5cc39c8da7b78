"""UpstreamDeadline on mitmproxy test flows, with the event loop's clock moved by hand.

The timer is the loop's own (``call_later``); moving ``loop.time`` past it makes the
loop run it on its next turn, so no test waits for a real second to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from mitmproxy import flow as mflow
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils
from pydantic import ValidationError

from teegate.addons import flowstate
from teegate.addons.deadline import UpstreamDeadline
from teegate.addons.errors import next_error_page
from teegate.addons.flowstate import Route
from teegate.config import UpstreamSettings

TIMEOUT_S = 30


class Handler:
    """Stands in for mitmproxy's connection handler of the flow's client."""

    def __init__(self, server_conn: Any) -> None:
        self.transports = {server_conn: object()}
        self.closed: list[Any] = []

    def close_connection(self, conn: Any) -> None:
        self.closed.append(conn)


def chat(route: str | None = "chat", request_id: str = "req_1"):
    """A flow as the chain hands it over: routed (``route``) and given its request id.

    The one place this module writes the earlier addons' flow state."""
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/v1/chat/completions"))
    if route is not None:
        flowstate.set_route(f, Route(route))
    flowstate.set_request_id(f, request_id)
    return f


class Harness:
    def __init__(self, addon: UpstreamDeadline, proxyserver: Proxyserver) -> None:
        self.addon = addon
        self._proxyserver = proxyserver
        self._loop = asyncio.get_running_loop()
        self._real_time = self._loop.time
        self._offset = 0.0

    def connect(self, f) -> Handler:
        handler = Handler(f.server_conn)
        self._proxyserver.connections[f.client_conn.id] = handler  # type: ignore[assignment]
        return handler

    async def advance(self, seconds: float) -> None:
        """Move the loop's clock on and let it run whatever fell due."""
        self._offset += seconds
        for _ in range(3):
            await asyncio.sleep(0)

    def time(self) -> float:
        return self._real_time() + self._offset


@pytest.fixture
async def harness(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    addon, proxyserver = UpstreamDeadline(UpstreamSettings(timeout_s=TIMEOUT_S)), Proxyserver()
    with taddons.context(proxyserver, addon):
        h = Harness(addon, proxyserver)
        monkeypatch.setattr(asyncio.get_running_loop(), "time", h.time)
        next_error_page.set(None)
        yield h


async def test_silence_past_the_deadline_closes_the_upstream_and_answers_504(harness):
    f = chat()
    handler = harness.connect(f)
    with structlog.testing.capture_logs() as logs:
        harness.addon.request(f)
        await harness.advance(TIMEOUT_S - 1)
        assert handler.closed == [] and not flowstate.timed_out(f)
        await harness.advance(2)
    assert handler.closed == [f.server_conn]
    assert flowstate.timed_out(f) is True
    assert logs == [{"event": "upstream_timeout", "log_level": "warning", "request_id": "req_1"}]
    # mitmproxy then reports the flow's error; the page it writes is ours.
    f.error = mflow.Error("Connection killed.")
    harness.addon.error(f)
    err = next_error_page.get()
    assert (err.status, err.code, err.type) == (504, "upstream_timeout", "api_error")
    assert flowstate.error_code(f) == "upstream_timeout"
    assert flowstate.sent_status(f) == 504  # what the access log and metrics record


async def test_a_connect_still_under_way_at_the_deadline_is_cancelled(harness):
    """Before its connection is set up the flow holds a placeholder; the connection being
    opened (to the flow's address, TCP or TLS not done) is the one closed, and a kept-alive
    connection of the same client to the same address is left alone."""
    from mitmproxy.connection import Server

    f = chat()
    handler = harness.connect(f)
    handler.transports.clear()  # the placeholder is not among the handler's connections
    address = (f.request.host, f.request.port)
    kept = Server(address=address, timestamp_tcp_setup=1.0)  # plain, set up: another's
    connecting = Server(address=address)  # SYN sent, never answered
    handshaking = Server(address=address, timestamp_tcp_setup=1.0, tls=True)
    elsewhere = Server(address=("other.example", 443))
    for conn in (kept, connecting, handshaking, elsewhere):
        handler.transports[conn] = object()
    harness.addon.request(f)
    await harness.advance(TIMEOUT_S + 1)
    assert handler.closed == [connecting, handshaking]
    assert flowstate.timed_out(f) is True
    f.error = mflow.Error("connection cancelled")
    harness.addon.error(f)
    err = next_error_page.get()
    assert (err.status, err.code) == (504, "upstream_timeout")
    assert err.response().headers["x-request-id"] == "req_1"


@pytest.mark.parametrize("hook", ["responseheaders", "response", "error"])
async def test_any_answer_or_failure_stops_the_timer(harness, hook):
    f = chat()
    handler = harness.connect(f)
    harness.addon.request(f)
    if hook != "error":
        f.response = tutils.tresp()
    getattr(harness.addon, hook)(f)
    await harness.advance(TIMEOUT_S * 10)
    assert handler.closed == []
    assert not flowstate.timed_out(f)


@pytest.mark.parametrize(
    "state",
    [
        pytest.param("local", id="answered locally"),
        pytest.param("passthrough", id="egress passthrough"),
        pytest.param("refused", id="a refused chat"),
    ],
)
async def test_only_a_chat_going_upstream_is_timed(harness, state):
    f = chat(route="chat" if state == "refused" else state)
    if state == "refused":
        f.response = tutils.tresp(status_code=402)
    handler = harness.connect(f)
    harness.addon.request(f)
    await harness.advance(TIMEOUT_S * 10)
    assert handler.closed == [] and not flowstate.timed_out(f)


async def test_a_flow_no_longer_live_is_not_touched(harness):
    f = chat()
    handler = harness.connect(f)
    harness.addon.request(f)
    f.live = False
    await harness.advance(TIMEOUT_S + 1)
    assert handler.closed == [] and not flowstate.timed_out(f)


async def test_a_failure_without_the_deadline_is_a_502(harness):
    f = chat()
    harness.addon.request(f)
    f.error = mflow.Error("Connection refused: b'client bytes'")
    harness.addon.error(f)
    err = next_error_page.get()
    assert (err.status, err.code) == (502, "upstream_unreachable")
    assert "client bytes" not in err.message
    assert flowstate.error_code(f) == "upstream_unreachable"
    assert flowstate.sent_status(f) == 502


@pytest.mark.parametrize("route", ["local", "passthrough", None])
async def test_other_failures_keep_mitmproxy_s_own_page(harness, route):
    f = chat(route=route)
    f.error = mflow.Error("Connection refused")
    harness.addon.error(f)
    assert next_error_page.get() is None
    assert flowstate.error_code(f) is None


async def test_a_failure_after_the_response_keeps_mitmproxy_s_own_page(harness):
    f = chat()
    f.response = tutils.tresp()
    f.error = mflow.Error("Client disconnected.")
    harness.addon.error(f)
    assert next_error_page.get() is None


@pytest.mark.parametrize("seconds", [0, -5])
def test_a_timeout_below_one_second_is_refused_by_the_settings(seconds):
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        UpstreamSettings(timeout_s=seconds)
