"""The openai SDK stops retrying what no retry can fix, because the gateway says so.

The SDK retries every 5xx by default (``_should_retry``), unless the answer carries
``x-should-retry: false``. Each attempt is one access-log line, written before its answer
leaves, so once the SDK has raised, the log holds every attempt it made.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.gateway_proc import GatewayProc
from tests.support.testdata import TEE


def attempts(gateway: GatewayProc, path: str, status: int) -> int:
    count = 0
    for line in gateway.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "request" and (entry.get("path"), entry.get("status")) == (
            path,
            status,
        ):
            count += 1
    return count


def retrying_sdk(gateway: GatewayProc) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.api_base, api_key=gateway.api_key, max_retries=2, timeout=30
    )


def test_a_503_not_available_is_sent_once(gateway):
    before = attempts(gateway, "/v1/embeddings", 503)
    with retrying_sdk(gateway) as client, pytest.raises(openai.InternalServerError) as exc:
        client.embeddings.create(model=TEE, input="x")
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert exc.value.body["code"] == "not_available"
    assert attempts(gateway, "/v1/embeddings", 503) - before == 1


def test_a_400_is_sent_once(gateway):
    before = attempts(gateway, "/v1/chat/completions", 400)
    with retrying_sdk(gateway) as client, pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=TEE, messages=[], temperature=7)
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert exc.value.body["status"] == 400
    assert attempts(gateway, "/v1/chat/completions", 400) - before == 1


@pytest.mark.parametrize(
    ("status", "verdict", "sent"),
    [
        (400, "false", 1),  # the request is wrong for the upstream: refused again
        (503, "true", 2),  # the upstream is busy: the one retry allowed is made
    ],
)
def test_an_upstream_error_says_whether_to_retry(gateway, upstream, status, verdict, sent):
    upstream.behaviour(status=status)
    before = upstream.requests_seen()
    with (
        openai.OpenAI(
            base_url=gateway.api_base, api_key=gateway.api_key, max_retries=1, timeout=30
        ) as client,
        pytest.raises(openai.APIStatusError) as exc,
    ):
        client.chat.completions.create(model=TEE, messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == status
    assert exc.value.response.headers["x-should-retry"] == verdict
    chats = [r for r in upstream.requests(since=before) if r["path"] == "/v1/chat/completions"]
    assert len(chats) == sent


def test_an_upstream_500_leaves_the_sdk_its_own_rule(gateway, upstream, http):
    upstream.behaviour(status=500)
    body = {"model": TEE, "messages": [{"role": "user", "content": "x"}]}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 500
    assert "x-should-retry" not in resp.headers
