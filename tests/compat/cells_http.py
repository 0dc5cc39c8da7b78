"""Raw HTTP clients' cells (requests, curl): JSON bodies and server-sent events read by hand.

In egress mode requests reads HTTPS_PROXY and REQUESTS_CA_BUNDLE, curl HTTPS_PROXY and
CURL_CA_BUNDLE, from the runner's environment.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.compat.py_cells import Outcome, Target, cell

# -- requests -----------------------------------------------------------------------------------


def _post(t: Target, path: str, body: dict[str, Any], stream: bool = False):
    import requests

    r = requests.post(
        f"{t.api_base}{path}",
        json=body,
        headers={"Authorization": f"Bearer {t.api_key}"},
        stream=stream,
        timeout=30,
    )
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    return r


def _sse(lines: Any) -> Any:
    """The JSON events of a server-sent event stream (``data:`` lines), until ``[DONE]``."""
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode()
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


def _chat_stream_text(events: Any) -> Outcome:
    out = Outcome()
    for event in events:
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                out.text += piece
                out.chunks += 1
    return out


def _responses_stream_text(events: Any) -> Outcome:
    out = Outcome()
    done = None
    for event in events:
        if event.get("type") == "response.output_text.delta":
            out.text += event["delta"]
            out.chunks += 1
        elif event.get("type") in ("response.failed", "error"):
            raise RuntimeError(f"stream failed: {event}")
        elif event.get("type") == "response.completed":
            done = event
    assert done is not None, "no response.completed event"
    return out


def _responses_text(body: dict[str, Any]) -> str:
    return "".join(
        part.get("text", "")
        for item in body.get("output") or []
        if item.get("type") == "message"
        for part in item.get("content") or []
        if part.get("type") == "output_text"
    )


@cell("requests", "chat")
def requests_chat(t: Target) -> Outcome:
    body = {"model": t.model, "messages": [{"role": "user", "content": t.prompt}]}
    r = _post(t, "/chat/completions", body)
    return Outcome(text=r.json()["choices"][0]["message"]["content"])


@cell("requests", "stream")
def requests_stream(t: Target) -> Outcome:
    body = {"model": t.model, "messages": [{"role": "user", "content": t.prompt}], "stream": True}
    with _post(t, "/chat/completions", body, stream=True) as r:
        return _chat_stream_text(_sse(r.iter_lines()))


@cell("requests", "responses")
def requests_responses(t: Target) -> Outcome:
    r = _post(t, "/responses", {"model": t.model, "input": t.prompt})
    return Outcome(text=_responses_text(r.json()))


@cell("requests", "responses_stream")
def requests_responses_stream(t: Target) -> Outcome:
    body = {"model": t.model, "input": t.prompt, "stream": True}
    with _post(t, "/responses", body, stream=True) as r:
        return _responses_stream_text(_sse(r.iter_lines()))


# -- curl -----------------------------------------------------------------------------------------


def _curl(t: Target, path: str, body: dict[str, Any], stream: bool = False) -> str:
    """curl as a user types it; in egress mode it reads HTTPS_PROXY and CURL_CA_BUNDLE."""
    args = ["curl", "-sS", "--fail-with-body", "--max-time", "30"]
    if stream:
        args.append("-N")
    args += [
        f"{t.api_base}{path}",
        "-H",
        f"authorization: Bearer {t.api_key}",
        "-H",
        "content-type: application/json",
        "-d",
        json.dumps(body),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=40)
    if done.returncode != 0:
        detail = f"{done.stderr.strip()} {done.stdout[:300]}"
        raise RuntimeError(f"curl exit {done.returncode}: {detail}")
    return done.stdout


@cell("curl", "chat")
def curl_chat(t: Target) -> Outcome:
    body = {"model": t.model, "messages": [{"role": "user", "content": t.prompt}]}
    answer = json.loads(_curl(t, "/chat/completions", body))
    return Outcome(text=answer["choices"][0]["message"]["content"])


@cell("curl", "stream")
def curl_stream(t: Target) -> Outcome:
    body = {"model": t.model, "messages": [{"role": "user", "content": t.prompt}], "stream": True}
    return _chat_stream_text(_sse(_curl(t, "/chat/completions", body, True).splitlines()))


@cell("curl", "responses")
def curl_responses(t: Target) -> Outcome:
    out = _curl(t, "/responses", {"model": t.model, "input": t.prompt})
    return Outcome(text=_responses_text(json.loads(out)))


@cell("curl", "responses_stream")
def curl_responses_stream(t: Target) -> Outcome:
    body = {"model": t.model, "input": t.prompt, "stream": True}
    return _responses_stream_text(_sse(_curl(t, "/responses", body, True).splitlines()))
