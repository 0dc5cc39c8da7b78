"""Deterministic chat-completion answers: what the sandbox says, independent of how it is sent.

Token accounting (what ``usage`` reports) is documented here because tests and the benchmark
check the gateway's metering against it:

- ``prompt_tokens`` = sum over messages of ``ceil(utf8_bytes(text content) / 4) + 4``, where the
  text content is the string content, or the concatenated ``text`` of ``{"type": "text"}`` parts.
- ``completion_tokens`` = number of pieces in the answer (each piece is one streamed content or
  tool-argument delta), i.e. ``--chunks`` for plain text unless ``max_tokens`` cuts it short.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


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


def value_for_schema(schema: Any) -> Any:
    """A value satisfying a (simple) JSON schema: required properties only, strings "sandbox"."""
    if not isinstance(schema, dict):
        return "sandbox"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        return {
            name: value_for_schema(props.get(name)) for name in required if isinstance(name, str)
        }
    return {"integer": 1, "number": 1, "boolean": True, "array": [], "null": None}.get(
        kind, "sandbox"
    )


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
    return functions[0]


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
        value = value_for_schema(schema) if isinstance(schema, dict) else {}
        return json.dumps(value if isinstance(value, dict) else {"value": value})
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


def plan_answer(body: dict[str, Any], model: str, chunks: int) -> Answer:
    """Decide the answer for a validated request body (raises BadRequest on bad options)."""
    limit = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    tool = _chosen_tool(body)
    if tool is not None:
        value = value_for_schema(tool.get("parameters") or {"type": "object"})
        arguments = json.dumps(value if isinstance(value, dict) else {})
        return Answer(split_even(arguments, chunks), "tool_calls", tool_name=tool["name"])
    json_text = _json_content(body, model)
    pieces = sentence_pieces(model, chunks) if json_text is None else split_even(json_text, chunks)
    if limit is not None and limit < len(pieces):
        return Answer(pieces[:limit], "length")
    return Answer(pieces, "stop")
