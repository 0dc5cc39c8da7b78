"""Malformed requests get OpenAI's envelope with the right param, and never go upstream."""

from __future__ import annotations

import pytest

from tests.support.clients import chat_count
from tests.support.testdata import TEE

OK_MSG = [{"role": "user", "content": "hi"}]


def _post(http, body: bytes | str):
    return http.post(
        "/v1/chat/completions",
        content=body if isinstance(body, bytes) else body.encode(),
        headers={"content-type": "application/json"},
    )


def _assert_envelope(resp, status: int, code: str | None = None, param: str | None = None):
    assert resp.status_code == status, resp.text
    doc = resp.json()
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code", "status"}
    assert err["status"] == status
    assert err["message"]
    assert doc["status"] == status
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"text"', b"", b'{"model": NaN}', b"\xff\xfe"],
)
def test_unparseable_bodies(http, upstream, body):
    err = _assert_envelope(_post(http, body), 400)
    assert err["type"] == "invalid_request_error"
    assert chat_count(upstream) == 0


def test_duplicate_keys_cannot_smuggle_a_model(http, upstream):
    body = f'{{"model": "deepseek-ai/DeepSeek-V3", "model": "{TEE}", "messages": []}}'
    _assert_envelope(_post(http, body), 400, "invalid_json")
    assert chat_count(upstream) == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": OK_MSG}, "model"),
        ({"model": TEE}, "messages"),
        ({"model": 7, "messages": OK_MSG}, "model"),
        ({"model": TEE, "messages": "hi"}, "messages"),
        ({"model": TEE, "messages": [{"role": "usr", "content": "x"}]}, "messages[0].role"),
        ({"model": TEE, "messages": OK_MSG, "temperature": 2.5}, "temperature"),
        ({"model": TEE, "messages": OK_MSG, "temperature": -0.1}, "temperature"),
        ({"model": TEE, "messages": OK_MSG, "top_p": 1.5}, "top_p"),
        ({"model": TEE, "messages": OK_MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": TEE, "messages": OK_MSG, "max_tokens": "10"}, "max_tokens"),
        ({"model": TEE, "messages": OK_MSG, "stream": "yes"}, "stream"),
    ],
)
def test_schema_errors_name_the_param(http, upstream, body, param):
    _assert_envelope(http.post("/v1/chat/completions", json=body), 400, param=param)
    assert chat_count(upstream) == 0


def test_validation_errors_do_not_echo_input(http):
    secret = "MARKER-echo-4f1e"
    resp = http.post(
        "/v1/chat/completions",
        json={"model": TEE, "messages": [{"role": secret, "content": secret}]},
    )
    assert resp.status_code == 400 and secret not in resp.text
