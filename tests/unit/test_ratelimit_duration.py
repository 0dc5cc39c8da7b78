"""OpenAI writes ``x-ratelimit-reset-requests`` as a Go-style duration; clients parse that shape."""

import pytest

from teegate.addons.errors import GatewayError, should_retry
from teegate.addons.ratelimit import duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (6, "6s"),
        (60, "1m0s"),
        (0.5, "0.5s"),
        (0.017, "0.017s"),
        (59.9996, "1m0s"),
        (3725.25, "1h2m5.25s"),
        (-1, "0s"),
    ],
)
def test_duration(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("status", "code", "header"),
    [
        (400, "invalid_json", "false"),
        (401, "invalid_api_key", "false"),
        (402, "insufficient_balance", "false"),
        (404, "not_found", "false"),
        (408, None, "true"),
        (409, None, "true"),
        (429, "rate_limit_exceeded", "true"),
        (503, "not_available", "false"),
        (503, "catalog_unavailable", "true"),
        (503, "no_attested_instance", "true"),
        (503, "e2ee_instance_unavailable", "true"),
        (503, "billing_unavailable", "true"),
        (502, "upstream_unreachable", "true"),
        (504, "upstream_timeout", "true"),
        (502, "upstream_model_mismatch", "true"),
        (500, "internal_error", "false"),
    ],
)
def test_x_should_retry(status, code, header):
    resp = GatewayError(status, "m", code).response()
    assert resp.headers["x-should-retry"] == header
    assert should_retry(status, code) is (header == "true")


def test_envelope_has_status_inside_error_and_beside_it():
    body = GatewayError(402, "m", "insufficient_balance").body()
    assert body["error"] == {
        "message": "m",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_balance",
        "status": 402,
    }
    assert body["status"] == 402
