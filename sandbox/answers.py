"""Deterministic chat-completion answers: what the sandbox says, independent of how it is sent.

Token accounting (what ``usage`` reports) is documented here because tests and the benchmark
check the gateway's metering against it:

- ``prompt_tokens`` = sum over messages of ``ceil(utf8_bytes(text content) / 4) + 4``, where the
  text content is the string content, or the concatenated ``text`` of ``{"type": "text"}`` parts.
- ``completion_tokens`` = number of pieces generated across all ``n`` choices (each piece is one
  streamed reasoning, content or tool-argument delta), i.e. ``--chunks`` for one plain answer
  unless ``stop`` or ``max_tokens`` cuts it short.

Behaving like a model (so agent loops and structured-output clients complete): a tool is called
only when the last message is the user's; after tool results the answer is text that quotes
them. ``seed`` picks the words (same seed, same text); ``n`` gives distinct choices; a reasoning
model asked to reason (``reasoning_effort``) thinks in ``reasoning`` pieces first.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from teegate.sandbox.schema_values import value_for_schema

REASONING = ["Considering", " the request", " before answering."]
SEED_WORDS = ["alpha", "bravo", "cedar", "delta", "ember", "fjord", "gale", "harbor", "iris"]
MAX_N = 16


class BadRequest(Exception):
    """The request is malformed (answered 400 in OpenAI's error envelope)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Answer:
    """One planned answer: text pieces, or the argument pieces of a single tool call."""

    pieces: list[str]
    finish_reason: str
    tool_name: str | None = None
    reasoning: list[str] = field(default_factory=list)

    @property
    def generated(self) -> int:
        """Pieces generated (reasoning included): what ``completion_tokens`` counts."""
        return len(self.pieces) + len(self.reasoning)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Sum over messages of ceil(utf8 bytes / 4) + 4 (see the module docstring)."""
    total = 0
    for message in messages:
        n = len(_text_of(message.get("content")).encode("utf-8"))
        total += -(-n // 4) + 4
    return total


def split_even(text: str, parts: int) -> list[str]:
    """``text`` cut into ``parts`` contiguous pieces (fewer if it is shorter than that)."""
    k = min(parts, len(text))
    if k <= 0:
        return [text] if text else []
    bounds = [round(i * len(text) / k) for i in range(k + 1)]
    return [text[bounds[i] : bounds[i + 1]] for i in range(k)]


def sentence_pieces(model: str, chunks: int) -> list[str]:
    """The fixed reply, in ``chunks`` pieces: "Sandbox reply from <model> #1 #2 ... #n-1."."""
    pieces = [f"Sandbox reply from {model}"] + [f" #{i}" for i in range(1, chunks)]
    pieces[-1] += "."
    return pieces


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"'{key}' must be a positive integer", key)
    return value


def _chosen_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the answer calls, or None for a plain answer."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise BadRequest("'tools' must be a list of function tools with names", "tools")
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    functions = [t["function"] for t in tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        for function in functions:
            if function["name"] == name:
                return function
        raise BadRequest(f"tool_choice names an unknown tool: {name!r}", "tool_choice")
    if choice not in ("auto", "required"):
        raise BadRequest(
            "'tool_choice' must be none, auto, required or a named function", "tool_choice"
        )
    called = {
        call.get("function", {}).get("name")
        for message in body.get("messages") or []
        if isinstance(message, dict) and isinstance(message.get("tool_calls"), list)
        for call in message["tool_calls"]
        if isinstance(call, dict) and isinstance(call.get("function"), dict)
    }
    # A tool not called yet, first: after a text answer, an agent that wants its output as a
    # tool call (pydantic-ai's ``final_result``) asks again, and gets that tool, not a loop.
    return next((f for f in functions if f["name"] not in called), functions[0])


def _json_content(body: dict[str, Any], model: str) -> str | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"model": model, "answer": "sandbox"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return json.dumps(value_for_schema(schema) if isinstance(schema, dict) else {})
    raise BadRequest(
        "'response_format.type' must be text, json_object or json_schema", "response_format"
    )


def validate_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required and must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise BadRequest("every message must be an object", "messages")
    return messages


def _tool_results_pending(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tool messages after the last user message (what a text answer should use)."""
    results: list[dict[str, Any]] = []
    for message in reversed(messages):
        if message.get("role") == "user":
            break
        if message.get("role") == "tool":
            results.insert(0, message)
    return results


def _text_pieces(
    model: str, chunks: int, index: int, seed: int | None, results: list[dict[str, Any]]
) -> list[str]:
    pieces = sentence_pieces(model, chunks)
    pieces[0] = pieces[0].rstrip(".")
    if results:
        quoted = "; ".join(_text_of(r.get("content")) for r in results)[:200]
        pieces[0] += f", using the tool result: {quoted}"
    if index:
        pieces[0] += f" (choice {index + 1})"
    if seed is not None:
        rng = random.Random(f"{seed}:{index}")
        pieces[0] += f" {rng.choice(SEED_WORDS)}"
        pieces[1:] = [f" {rng.choice(SEED_WORDS)}" for _ in pieces[1:]]
    if not pieces[-1].endswith("."):
        pieces[-1] += "."
    return pieces


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) for x in stops):
        raise BadRequest("'stop' must be a string or a list of up to 4 strings", "stop")
    return [x for x in stops if x]


def _cut_at_stop(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """Pieces before the first stop string (and whether one was found)."""
    text = "".join(pieces)
    cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
    if cut < 0:
        return pieces, False
    kept: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) >= cut:
            if cut > used:
                kept.append(piece[: cut - used])
            break
        kept.append(piece)
        used += len(piece)
    return kept, True


def _limited(
    pieces: list[str], reasoning: list[str], limit: int | None, tool: str | None
) -> Answer:
    finish = "tool_calls" if tool else "stop"
    if limit is not None and limit < len(reasoning) + len(pieces):
        room = max(limit - len(reasoning), 0)
        return Answer(pieces[:room], "length", tool, reasoning[:limit])
    return Answer(pieces, finish, tool, reasoning)


def requested_choices(body: dict[str, Any]) -> int:
    n = _positive_int(body, "n") or 1
    if n > MAX_N:
        raise BadRequest(f"'n' must be at most {MAX_N}", "n")
    return n


def requested_logprobs(body: dict[str, Any]) -> int | None:
    """None: no logprobs; otherwise how many ``top_logprobs`` each token carries."""
    wants = body.get("logprobs")
    top = body.get("top_logprobs")
    if wants not in (None, True, False):
        raise BadRequest("'logprobs' must be a boolean", "logprobs")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
            raise BadRequest("'top_logprobs' must be an integer from 0 to 20", "top_logprobs")
        if wants is not True:
            raise BadRequest("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    return (top or 0) if wants is True else None


def token_logprobs(pieces: list[str], top: int) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries for ``pieces`` (deterministic values)."""
    out = []
    for j, piece in enumerate(pieces):
        logprob = -round(0.01 + 0.01 * (j % 7), 4)
        entry = {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}
        alternatives = [
            {"token": f" alt{k}", "logprob": logprob - k, "bytes": list(f" alt{k}".encode())}
            for k in range(1, top)
        ]
        out.append({**entry, "top_logprobs": ([dict(entry)] + alternatives)[:top]})
    return out


def plan_answers(
    body: dict[str, Any], model: str, chunks: int, reasoning_model: bool = False
) -> list[Answer]:
    """Decide the ``n`` answers for a validated request body (BadRequest on bad options)."""
    limit = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    n = requested_choices(body)
    requested_logprobs(body)
    stops = _stops(body)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("'seed' must be an integer", "seed")
    tool = _chosen_tool(body)
    messages = body["messages"]
    last_role = messages[-1].get("role")
    effort = body.get("reasoning_effort")
    thinks = reasoning_model and (
        (effort is not None and effort != "none") or isinstance(body.get("reasoning"), dict)
    )
    reasoning = list(REASONING) if thinks else []
    json_text = _json_content(body, model)
    answers = []
    for index in range(n):
        if tool is not None and last_role == "user":
            value = value_for_schema(tool.get("parameters") or {"type": "object"})
            arguments = json.dumps(value if isinstance(value, dict) else {})
            answers.append(_limited(split_even(arguments, chunks), reasoning, limit, tool["name"]))
            continue
        if json_text is not None:
            pieces = split_even(json_text, chunks)
        else:
            results = _tool_results_pending(messages)
            pieces = _text_pieces(model, chunks, index, seed, results)
        pieces, _ = _cut_at_stop(pieces, stops)
        answers.append(_limited(pieces, reasoning, limit, None))
    return answers
