"""ResponseHeaders writes what the addons collected, once per response object."""

from __future__ import annotations

from mitmproxy.test import tflow, tutils

from teegate.addons import flowstate
from teegate.addons.flowstate import Route
from teegate.addons.headers import ResponseHeaders, add_headers

OWN = ("x-teegate-attestation-mode", "x-teegate-quote-sha256")


def _writer() -> ResponseHeaders:
    return ResponseHeaders(own=OWN, defaults=lambda: {"x-teegate-attestation-mode": "dcap"})


def _flow(route: Route = Route.CHAT, upstream_headers: list[tuple[bytes, bytes]] | None = None):
    flow = tflow.tflow(resp=tutils.tresp(headers=upstream_headers or []))
    flowstate.set_route(flow, route)
    return flow


def test_added_headers_replace_the_upstreams_and_the_rest_is_kept() -> None:
    flow = _flow(
        upstream_headers=[
            (b"X-Request-Id", b"upstream-id"),
            (b"content-type", b"application/json"),
            (b"X-Teegate-Quote-Sha256", b"spoofed"),
        ]
    )
    add_headers(flow, {"x-request-id": "req_1"})
    add_headers(flow, {"x-ratelimit-remaining": "9"})
    _writer().responseheaders(flow)
    h = flow.response.headers
    assert h.get_all("x-request-id") == ["req_1"]
    assert h["x-ratelimit-remaining"] == "9"
    assert h["content-type"] == "application/json"
    assert "x-teegate-quote-sha256" not in h  # only the gateway speaks for it
    assert h["x-teegate-attestation-mode"] == "dcap"  # the default


def test_written_once_per_response_and_again_for_a_replacement() -> None:
    flow = _flow()
    writer = _writer()
    add_headers(flow, {"x-request-id": "req_1"})
    writer.responseheaders(flow)
    flow.response.headers["x-request-id"] = "changed later"
    writer.response(flow)  # same response object: not written twice
    assert flow.response.headers["x-request-id"] == "changed later"
    flow.response = tutils.tresp(status_code=500)  # e.g. a refusal replacing the answer
    writer.response(flow)
    assert flow.response.headers["x-request-id"] == "req_1"
    assert flow.response.headers["x-teegate-attestation-mode"] == "dcap"


def test_egress_passthrough_keeps_the_sites_headers() -> None:
    flow = _flow(Route.PASSTHROUGH, [(b"x-teegate-quote-sha256", b"theirs")])
    add_headers(flow, {"x-request-id": "req_1"})
    _writer().response(flow)
    h = flow.response.headers
    assert h["x-teegate-quote-sha256"] == "theirs"
    assert "x-teegate-attestation-mode" not in h
    assert h["x-request-id"] == "req_1"
