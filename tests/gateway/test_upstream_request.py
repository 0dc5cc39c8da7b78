"""What goes upstream is built, never passed through: proven at a recording upstream.

A real gateway in front of the real sandbox, which records the method, raw target, headers and
body of every request it receives (sandbox/recording.py). Refused requests must leave no record
there; accepted ones must arrive as exactly ``POST /v1/chat/completions`` with an allow-listed
body holding the one paid output budget. Answers naming another model are never relayed.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from teegate.addons.schema import ALLOWED_FIELDS, MESSAGE_FIELDS, NEVER_ALLOWED
from teegate.config import ConfigError, load
from tests.support.accounts import balance_micro
from tests.support.billing import usage_row
from tests.support.clients import sdk
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE

MSG = [{"role": "user", "content": "hi"}]
OPERATOR_FIELD = "x_operator_hint"


class Recorded:
    """What reached the upstream, as the sandbox recorded it (cleared with it before each test)."""

    def __init__(self, upstream: SandboxProc) -> None:
        self._upstream = upstream

    def chats(self) -> list[dict]:
        """Records that reached the chat endpoint, however spelled (not the gateway's own
        fetches of each answer's signature, ``/v1/signature/chatcmpl-...``)."""
        return [
            {**r, "query": r["query"] or "", "body": r["body_text"]}
            for r in self._upstream.requests()
            if "chat" in r["target"] and not r["path"].startswith("/v1/signature/")
        ]


@pytest.fixture
def recorder(upstream: SandboxProc) -> Recorded:
    return Recorded(upstream)


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    extra = f'request.extra_fields = ["{OPERATOR_FIELD}", "top_k"]\n'
    with start_gateway(upstream.base_url, extra_toml=extra) as gw:
        yield gw


def _post(http: httpx.Client, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return http.post(path, json=body)


def _error(resp: httpx.Response, status: int, code: str, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    return err


def _raw(gateway: GatewayProc, method: str, target: str, body: bytes) -> tuple[int, bytes]:
    """One request with the method and target exactly as given (http.client sends them as is)."""
    u = urlsplit(gateway.base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in (
            ("host", u.netloc),
            ("authorization", f"Bearer {gateway.api_key}"),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ):
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- the request line ---------------------------------------------------------------------------


def test_upstream_gets_exactly_post_chat_path_and_built_headers(client, recorder):
    client.chat.completions.create(model=TEE, messages=MSG, max_tokens=5)
    (rec,) = recorder.chats()
    assert (rec["method"], rec["target"], rec["query"]) == ("POST", "/v1/chat/completions", "")
    names = {k for k, _ in rec["headers"]}
    assert names <= {
        "host",
        "content-type",
        "content-length",
        "accept",
        "accept-encoding",
        "authorization",
        "user-agent",
        "x-request-id",
    }, names
    assert dict(rec["headers"])["authorization"] == "Bearer sandbox-upstream-key"


@pytest.mark.parametrize(
    ("query", "param"),
    [("model=deepseek-ai/DeepSeek-V3", "model"), ("api-key=sk-x", "api-key"), ("a=1&b=2", "a")],
)
def test_query_strings_are_refused_naming_the_param(http, recorder, query, param):
    body = {"model": TEE, "messages": MSG}
    err = _error(
        _post(http, body, f"/v1/chat/completions?{query}"), 400, "unsupported_parameter", param
    )
    assert "query" in err["message"].lower()
    assert recorder.chats() == []


def test_an_empty_query_string_is_refused_too(gateway, recorder):
    body = json.dumps({"model": TEE, "messages": MSG}).encode()
    status, raw = _raw(gateway, "POST", "/v1/chat/completions?", body)
    assert status == 400 and b"unsupported_parameter" in raw
    assert recorder.chats() == []


@pytest.mark.parametrize(
    "target",
    [
        "/v1/chat/completions/",
        "/v1/chat/completions;x=1",
        "//v1/chat/completions",
        "/v1/chat/%63ompletions",
        "/v1/chat%2Fcompletions",
        "/v1/chat/completions#x",
        "/v1/./chat/completions",
        "/V1/chat/completions",
    ],
)
def test_path_variants_never_reach_the_upstream(gateway, recorder, target):
    body = json.dumps({"model": TEE, "messages": MSG}).encode()
    status, raw = _raw(gateway, "POST", target, body)
    assert status in (400, 404), raw[:200]
    assert recorder.chats() == []


@pytest.mark.parametrize("method", ["post", "Post"])
def test_a_lower_case_post_is_sent_as_post(gateway, recorder, method):
    body = json.dumps({"model": TEE, "messages": MSG}).encode()
    status, raw = _raw(gateway, method, "/v1/chat/completions", body)
    assert status == 200, raw[:200]
    assert [r["method"] for r in recorder.chats()] == ["POST"]


@pytest.mark.parametrize("method", ["PUT", "GET", "PATCH", "POSTX"])
def test_other_methods_are_405(gateway, recorder, method):
    body = json.dumps({"model": TEE, "messages": MSG}).encode()
    status, raw = _raw(gateway, method, "/v1/chat/completions", body)
    assert status == 405, raw[:200]
    assert recorder.chats() == []


# -- the body -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    sorted(
        {
            "models",
            "route",
            "provider",
            "fallbacks",
            "api_base",
            "base_url",
            "api_key",
            "extra_body",
            "best_of",
            "use_beam_search",
            "chat_template",
            "logits_processors",
            "store",
            "service_tier",
            "totally_unknown",
        }
    ),
)
def test_fields_off_the_allow_list_are_refused_by_name(http, recorder, field):
    body = {"model": TEE, "messages": MSG, field: ["x"]}
    err = _error(_post(http, body), 400, "unsupported_parameter", field)
    assert field in err["message"]
    assert recorder.chats() == []


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi", "model": TEE}]}, "messages[0].model"),
        ({"messages": [{"role": "user", "content": "hi", "audio": {}}]}, "messages[0].audio"),
        ({"stream": True, "stream_options": {"fallback": 1}}, "stream_options.fallback"),
    ],
)
def test_nested_keys_are_allow_listed_too(http, recorder, patch, param):
    _error(
        _post(http, {"model": TEE, "messages": MSG, **patch}), 400, "unsupported_parameter", param
    )
    assert recorder.chats() == []


def test_allowed_extensions_and_operator_fields_arrive_as_sent(http, recorder):
    message = {"role": "assistant", "content": "a", "name": "n", "reasoning_content": "r"}
    extensions = {
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "chat_template_kwargs": {"enable_thinking": False},
        "stop_token_ids": [7],
        "min_tokens": 2,
        OPERATOR_FIELD: {"k": "v"},
    }
    body = {"model": TEE, "messages": [*MSG, message, *MSG], "max_tokens": 6, **extensions}
    assert _post(http, body).status_code == 200
    (rec,) = recorder.chats()
    sent = json.loads(rec["body"])
    assert {k: sent[k] for k in extensions} == extensions
    assert sent["messages"][1] == message
    assert set(sent) <= ALLOWED_FIELDS | {OPERATOR_FIELD}
    for m in sent["messages"]:
        assert set(m) <= MESSAGE_FIELDS


# -- one output budget --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "budget"),
    [
        ({"max_tokens": 7}, 7),
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 7, "max_completion_tokens": 7}, 7),
        ({}, 1024),  # proxy.toml [defaults] max_tokens
    ],
)
def test_upstream_receives_the_one_budget_in_both_fields(http, recorder, limits, budget):
    assert _post(http, {"model": TEE, "messages": MSG, **limits}).status_code == 200
    sent = json.loads(recorder.chats()[0]["body"])
    assert sent["max_tokens"] == sent["max_completion_tokens"] == budget


def test_two_different_budgets_are_refused(http, recorder):
    body = {"model": TEE, "messages": MSG, "max_tokens": 5, "max_completion_tokens": 500}
    _error(_post(http, body), 400, "invalid_value", "max_completion_tokens")
    assert recorder.chats() == []


def test_min_tokens_cannot_exceed_the_budget(http, recorder):
    body = {"model": TEE, "messages": MSG, "max_tokens": 5, "min_tokens": 6}
    _error(_post(http, body), 400, "invalid_value", "min_tokens")
    assert recorder.chats() == []


def test_the_reservation_covers_budget_times_n(gateway, http):
    def reserved(**limits) -> int:
        resp = _post(http, {"model": TEE, "messages": MSG, **limits})
        assert resp.status_code == 200, resp.text
        return usage_row(gateway.db, resp.headers["x-request-id"])["reserved_micro"]

    # Same body length (the prompt estimate reads the body), so only the output part differs.
    three = reserved(max_tokens=100, n=3)
    assert three == reserved(max_tokens=300, n=1) > reserved(max_tokens=100, n=1)


# -- the answer comes from the model that was attested ------------------------------------------


def _mismatch_logged(gateway: GatewayProc, rid: str) -> bool:
    for line in gateway.log_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "upstream_model_mismatch" and doc.get("request_id") == rid:
            return doc.get("level") == "error"
    return False


def test_a_plain_answer_from_another_model_is_502_and_released(gateway, upstream, client):
    upstream.behaviour(answer_model="deepseek-ai/DeepSeek-V3")  # listed, but not confidential
    before = balance_micro(gateway.db, "test")
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model=TEE, messages=MSG)
    resp = exc.value.response
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_model_mismatch"
    assert "choices" not in resp.text and "sandbox" not in resp.text.lower()
    rid = resp.headers["x-request-id"]
    assert usage_row(gateway.db, rid)["state"] == "released"
    assert balance_micro(gateway.db, "test") == before
    assert _mismatch_logged(gateway, rid)


def test_a_streamed_answer_from_another_model_ends_in_an_error_event(gateway, upstream, http):
    upstream.behaviour(answer_model="deepseek-ai/DeepSeek-V3")
    before = balance_micro(gateway.db, "test")
    body = {"model": TEE, "messages": MSG, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200  # the headers were on the wire before the first chunk
        text = resp.read().decode()
        rid = resp.headers["x-request-id"]
    events = [e for e in text.split("\n\n") if e.strip()]
    assert len(events) == 1, text  # the error event, nothing of the answer before or after it
    doc = json.loads(events[0].removeprefix("data: "))
    assert doc["error"]["code"] == "upstream_model_mismatch"
    assert usage_row(gateway.db, rid)["state"] == "released"
    assert balance_micro(gateway.db, "test") == before
    assert _mismatch_logged(gateway, rid)


def test_the_sdk_raises_on_a_mismatched_stream(gateway, upstream):
    upstream.behaviour(answer_model="someone/else")
    with sdk(gateway) as client, pytest.raises(openai.APIError) as exc:
        for _ in client.chat.completions.create(model=TEE, messages=MSG, stream=True):
            pass
    assert "different model" in exc.value.message


def test_matching_answers_are_relayed(client):
    plain = client.chat.completions.create(model=TEE, messages=MSG)
    assert plain.model == TEE and plain.choices[0].message.content
    chunks = list(client.chat.completions.create(model=TEE, messages=MSG, stream=True))
    assert chunks and all(c.model == TEE for c in chunks)


# -- configuration ------------------------------------------------------------------------------


def test_lists_are_disjoint_and_cover_the_documented_extensions():
    assert not ALLOWED_FIELDS & NEVER_ALLOWED
    assert {"top_k", "min_p", "repetition_penalty", "chat_template_kwargs"} <= ALLOWED_FIELDS
    assert {"models", "route", "provider", "fallbacks", "api_base", "base_url"} <= NEVER_ALLOWED


@pytest.mark.parametrize("name", ["route", "fallbacks", "best_of", "chat_template", "bad name"])
def test_config_refuses_never_allowed_extra_fields(tmp_path, name):
    path = tmp_path / "proxy.toml"
    path.write_text(f'[request]\nextra_fields = ["{name}"]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert "request.extra_fields" in str(exc.value) and name in str(exc.value)
