"""Instances generated from a JSON schema, so ``json_schema`` answers validate against it.

Why generated rather than fixed: a client's structured-output test (``parse`` with a pydantic
model, instructor, ...) validates the answer; a fixed document fails it for the sandbox's sake.
Covers what such schemas use: objects (required properties), arrays (``minItems``), ``enum``,
``const``, string formats and lengths, numbers with bounds and ``multipleOf``, local
``$ref``/``$defs``, and ``anyOf``/``oneOf``/``allOf`` (first branch). Not a full solver.
"""

from __future__ import annotations

import math
from typing import Any

STRING_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "email": "sandbox@example.com",
    "uri": "https://example.com/sandbox",
    "url": "https://example.com/sandbox",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "duration": "P1D",
}
MAX_DEPTH = 16  # a recursive schema ($ref to itself through required fields) stops here


def _resolve(root: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#"):
        return {}
    node: Any = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    step = 1 if integer else 0.5
    if isinstance(xlo, int | float) and not isinstance(xlo, bool):
        lo = max(lo, xlo + step) if isinstance(lo, int | float) else xlo + step
    if isinstance(xhi, int | float) and not isinstance(xhi, bool):
        hi = min(hi, xhi - step) if isinstance(hi, int | float) else xhi - step
    value: float = lo if isinstance(lo, int | float) else (min(1, hi) if hi is not None else 1)
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and multiple > 0:
        value = math.ceil(value / multiple) * multiple
    return math.ceil(value) if integer else value


def _string(schema: dict[str, Any]) -> str:
    text = STRING_FORMATS.get(str(schema.get("format")), "sandbox")
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text += "x" * (low - len(text))
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text


def value_for_schema(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A value satisfying ``schema`` (``root`` resolves ``$ref``; defaults to ``schema``)."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return "sandbox"
    root = schema if root is None else root
    if isinstance(schema.get("$ref"), str):
        return value_for_schema(_resolve(root, schema["$ref"]), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return value_for_schema(branches[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        return {
            name: value_for_schema(props.get(name), root, depth + 1)
            for name in required
            if isinstance(name, str)
        }
    if kind == "array":
        prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
        count = max(schema.get("minItems", 0) if isinstance(schema.get("minItems"), int) else 0, 0)
        items = [value_for_schema(p, root, depth + 1) for p in prefix[:count]]
        item = value_for_schema(schema.get("items"), root, depth + 1)
        return items + [item] * (count - len(items))
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string(schema)
