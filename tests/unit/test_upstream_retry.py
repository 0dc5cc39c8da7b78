"""UpstreamErrorRetry: an upstream's own error says whether a retry can help, by its status."""

from __future__ import annotations

import pytest
from mitmproxy.test import tflow, tutils

from teegate.addons import flowstate
from teegate.addons.flowstate import Route, Stage
from teegate.addons.upstream import UpstreamErrorRetry


def _flow(status: int, *, went_upstream: bool = True, headers=()):
    flow = tflow.tflow(resp=tutils.tresp(status_code=status, headers=list(headers)))
    flowstate.set_route(flow, Route.CHAT if went_upstream else Route.PASSTHROUGH)
    if went_upstream:
        flowstate.passed(flow, Stage.UPSTREAM)
    return flow


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (400, "false"),
        (401, "false"),
        (402, "false"),
        (403, "false"),
        (404, "false"),
        (422, "false"),
        (408, "true"),
        (409, "true"),
        (429, "true"),
        (502, "true"),
        (503, "true"),
        (504, "true"),
    ],
)
def test_the_verdict_follows_the_status(status: int, verdict: str) -> None:
    flow = _flow(status, headers=[(b"X-Should-Retry", b"maybe")])
    UpstreamErrorRetry().responseheaders(flow)
    assert flow.response.headers.get_all("x-should-retry") == [verdict]


def test_a_500_keeps_what_the_upstream_said_or_nothing() -> None:
    said = _flow(500, headers=[(b"x-should-retry", b"false")])
    silent = _flow(500)
    UpstreamErrorRetry().responseheaders(said)
    UpstreamErrorRetry().responseheaders(silent)
    assert said.response.headers["x-should-retry"] == "false"
    assert "x-should-retry" not in silent.response.headers


def test_success_and_other_sites_are_left_alone() -> None:
    ok = _flow(200)
    passthrough = _flow(400, went_upstream=False)
    UpstreamErrorRetry().responseheaders(ok)
    UpstreamErrorRetry().responseheaders(passthrough)
    assert "x-should-retry" not in ok.response.headers
    assert "x-should-retry" not in passthrough.response.headers
