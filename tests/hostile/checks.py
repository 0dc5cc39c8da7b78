"""What a hostile client may and may not achieve, as checks shared by the hostile tests.

The allow-lists are written out here, independently of the gateway's code: a test that imported
the gateway's list could not notice that list growing by mistake. When ``addons.schema`` has
``ALLOWED_FIELDS``, what reaches the upstream must fit both.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import parse_qsl

import httpx

from teegate.addons import schema
from tests.support.gateway_proc import GatewayProc
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import CONFIDENTIAL

MARKER = "HOSTILE-MARKER-4e1b7c"

# OpenAI's chat-completions request fields, plus the open-model sampling knobs upstreams take.
OPENAI_FIELDS = frozenset(
    {
        "model", "messages", "audio", "frequency_penalty", "function_call", "functions",
        "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
        "modalities", "n", "parallel_tool_calls", "prediction", "presence_penalty",
        "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
        "service_tier", "stop", "store", "stream", "stream_options", "temperature",
        "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
        "web_search_options",
    }
)  # fmt: skip
OPEN_MODEL_FIELDS = frozenset(
    {"top_k", "min_p", "repetition_penalty", "chat_template_kwargs", "min_tokens"}
)
ALLOW = OPENAI_FIELDS | OPEN_MODEL_FIELDS
# Fields that choose where or with what credentials a request goes: never upstream.
ROUTING_FIELDS = (
    "models", "route", "provider", "fallbacks", "api_base", "base_url", "api_key",
    "extra_body", "extra_headers", "extra_query", "transforms", "custom_llm_provider",
    "deployment_id", "api_version", "organization", "headers", "url", "endpoint",
)  # fmt: skip
GATEWAY_ALLOWED: frozenset[str] | None = getattr(schema, "ALLOWED_FIELDS", None)

# What addons/upstream.py builds for a chat completion, plus content-length (mitmproxy sets it
# when the body is assigned). Nothing the client sent is in this set unless rebuilt.
CHAT_HEADERS = frozenset(
    {
        "host", "content-type", "accept", "accept-encoding", "authorization", "user-agent",
        "x-request-id", "content-length",
    }
)  # fmt: skip
# The gateway's own httpx fetches (catalog/upstream.py, catalog/attestation/near_ai.py).
FETCH_HEADERS = frozenset(
    {"host", "accept", "accept-encoding", "connection", "user-agent", "authorization"}
)
ATTESTATION_QUERY = re.compile(r"^model=[^&]+&nonce=[0-9a-f]{64}&signing_algo=ecdsa$")
# The response signature of a served chat, by the completion id the upstream gave it.
SIGNATURE_PATH = re.compile(r"^/v1/signature/chatcmpl-sbx-[0-9]+$")
SIGNATURE_QUERY = re.compile(r"^model=[^&]+&signing_algo=ecdsa$")
DOCUMENTED_5XX = frozenset({502, 503, 504})  # upstream conditions only (addons/deadline.py, ...)


def assert_envelope(response: httpx.Response, *, head: bool = False) -> None:
    """A client-facing failure: never a 500, and always OpenAI's error envelope.

    ``head``: the answer to a HEAD request, which has no body to hold an envelope.
    """
    status = response.status_code
    assert status != 500, f"500 for client input: {response.content[:300]!r}"
    assert status < 500 or status in DOCUMENTED_5XX, f"undocumented {status}"
    if status < 400 or head:
        return
    try:
        doc = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{status} without a JSON body: {response.content[:300]!r}") from None
    error = doc.get("error") if isinstance(doc, dict) else None
    assert isinstance(error, dict), f"{status} without an error envelope: {doc!r}"[:400]
    assert {"message", "type", "param", "code"} <= error.keys(), error
    assert isinstance(error["message"], str) and isinstance(error["type"], str), error


def _header_names(entry: dict[str, Any]) -> list[str]:
    return [name.lower() for name, _ in entry["headers"]]


def upstream_violations(entry: dict[str, Any], upstream: SandboxProc, client_key: str) -> list[str]:
    """Every way one recorded upstream request breaks the allow-lists (empty: it is clean)."""
    bad: list[str] = []
    where = f"{entry['method']} {entry['target'][:120]}"
    names = _header_names(entry)
    headers = dict((n.lower(), v) for n, v in entry["headers"])
    if len(set(names)) != len(names):
        bad.append(f"{where}: repeated header names {sorted(names)}")
    if client_key in json.dumps(entry):
        bad.append(f"{where}: the client's API key reached the upstream")
    if any(MARKER.lower() in f"{n}: {v}".lower() for n, v in entry["headers"]):
        bad.append(f"{where}: the marker reached an upstream header")
    if MARKER in entry["target"]:
        bad.append(f"{where}: the marker reached the upstream path or query")
    if headers.get("authorization") != f"Bearer {upstream.api_key}":
        bad.append(f"{where}: authorization is not the upstream key")
    if headers.get("host") != f"127.0.0.1:{upstream.port}":
        bad.append(f"{where}: host header {headers.get('host')!r}")
    if entry["version"] != "1.1":
        bad.append(f"{where}: HTTP/{entry['version']}")

    if (entry["method"], entry["path"]) == ("POST", "/v1/chat/completions"):
        bad += _chat_violations(entry, where, set(names))
    elif (entry["method"], entry["path"]) == ("GET", "/v1/models"):
        bad += _fetch_violations(entry, where, set(names), query_ok=entry["query"] is None)
    elif (entry["method"], entry["path"]) == ("GET", "/v1/attestation/report"):
        query = entry["query"] or ""
        ok = ATTESTATION_QUERY.match(query) is not None
        ok = ok and dict(parse_qsl(query)).get("model") in CONFIDENTIAL
        bad += _fetch_violations(entry, where, set(names), query_ok=ok)
    elif entry["method"] == "GET" and SIGNATURE_PATH.match(entry["path"]):
        query = entry["query"] or ""
        ok = SIGNATURE_QUERY.match(query) is not None
        ok = ok and dict(parse_qsl(query)).get("model") in CONFIDENTIAL
        bad += _fetch_violations(entry, where, set(names), query_ok=ok)
    else:
        bad.append(f"{where}: not a request the gateway ever makes")
    return bad


def _fetch_violations(
    entry: dict[str, Any], where: str, names: set[str], *, query_ok: bool
) -> list[str]:
    bad = []
    if not query_ok:
        bad.append(f"{where}: unexpected query {entry['query']!r}")
    if extra := names - FETCH_HEADERS:
        bad.append(f"{where}: headers outside the fetch set {sorted(extra)}")
    if entry["body_size"]:
        bad.append(f"{where}: a body on a GET")
    return bad


def _chat_violations(entry: dict[str, Any], where: str, names: set[str]) -> list[str]:
    bad = []
    if entry["query"] is not None:
        bad.append(f"{where}: a query string reached the upstream")
    if extra := names - CHAT_HEADERS:
        bad.append(f"{where}: headers outside the built set {sorted(extra)}")
    body = entry["json"]
    if not entry["json_ok"] or not isinstance(body, dict):
        return [*bad, f"{where}: the body is not a JSON object"]
    if not _strict_json(entry["body_text"]):
        bad.append(f"{where}: the body is not strict JSON (NaN/Infinity, or not UTF-8)")
    keys = set(body)
    if extra := keys - ALLOW:
        bad.append(f"{where}: body fields outside the allow-list {sorted(extra)[:10]}")
    if GATEWAY_ALLOWED is not None and (extra := keys - GATEWAY_ALLOWED):
        bad.append(f"{where}: body fields outside addons.schema.ALLOWED_FIELDS {sorted(extra)}")
    if routing := keys & set(ROUTING_FIELDS):
        bad.append(f"{where}: routing fields upstream {sorted(routing)}")
    if any(MARKER in k for k in keys):
        bad.append(f"{where}: a client-made field name upstream")
    if body.get("model") not in CONFIDENTIAL:
        bad.append(f"{where}: model {str(body.get('model'))[:80]!r} is not a confidential one")
    return bad


def _reject_constant(name: str) -> None:
    raise ValueError(name)


def _strict_json(text: str | None) -> bool:
    """RFC 8259 JSON: Python's parser also takes NaN and Infinity, which no upstream should get."""
    if text is None:
        return False
    try:
        json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False
    return True


def assert_upstream_clean(
    upstream: SandboxProc, client_key: str, since: int = 0, min_chats: int = 0
) -> None:
    """Check every request the upstream received after its ``since``-th one.

    ``min_chats``: how many chat completions must be among them (so the check is not vacuous).
    """
    recorded = upstream.requests(since)
    problems = [p for e in recorded for p in upstream_violations(e, upstream, client_key)]
    unique = sorted(set(problems))
    assert not unique, f"{len(unique)} upstream violations:\n" + "\n".join(unique[:40])
    chats = sum(1 for e in recorded if e["path"] == "/v1/chat/completions")
    assert chats >= min_chats, f"{chats} chat completions reached the upstream, not {min_chats}"


def settle_output(gw: GatewayProc, timeout_s: float = 15.0) -> str:
    """The gateway's whole output once every earlier request has been logged.

    A fresh request's access-log line (found by the ``x-request-id`` it was answered with)
    comes after those of everything sent before it: waiting for that line bounds the wait on
    an observable condition, not a sleep.
    """
    response = httpx.get(
        gw.api_base + "/models", headers={"authorization": f"Bearer {gw.api_key}"}, timeout=10
    )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = gw.output_text()
        if request_id in text:
            return text
        time.sleep(0.05)
    raise AssertionError("the gateway never logged the settle request")


def assert_output_clean(gw: GatewayProc, *secrets: str) -> None:
    """Neither the marker nor the client's key (nor ``secrets``) in anything the gateway wrote."""
    text = settle_output(gw)
    assert "crashed" not in text.lower(), _around(text, "crashed")
    for secret in (MARKER, gw.api_key or "", *secrets):
        assert secret and secret not in text, _around(text, secret)
    # JSON log lines escape non-ASCII; the marker must not hide behind a case change either.
    assert MARKER.lower() not in text.lower(), _around(text.lower(), MARKER.lower())


def _around(text: str, needle: str) -> str:
    i = text.find(needle)
    lines = text.count("\n", 0, i) + 1
    return f"found {needle[:30]!r} on output line {lines}: {text[max(0, i - 300) : i + 100]!r}"
