"""A request body as a JSON object, strictly: every refusal a 400 envelope, never an exception.

``json.loads`` alone accepts what the gateway must not pass on or cannot re-serialize: duplicate
keys (two parsers could each pick a different one), ``NaN``/``Infinity`` and ``1e999`` (not JSON
once written back), integers of thousands of digits (costly to convert, wider than any upstream
stores), lone surrogates (valid as escapes, not as UTF-8), and nesting deep enough to exhaust the
recursion limit (a ``RecursionError``, not a ``ValueError``). Each is refused here, before the
body is validated as a chat request (addons/schema.py).
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from teegate.addons.errors import GatewayError

# After escaped backslashes and quotes are dropped, every '"' left delimits a string.
_STRING = re.compile(rb'"[^"]*"')
_NOT_QUOTES_OR_BRACKETS = bytes(b for b in range(256) if b not in b'"[]{}')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))
# A \uD800-\uDFFF escape: the only way a lone surrogate can reach a parsed string (raw
# surrogate bytes are not UTF-8, so decoding refuses them).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_MAX_INT_DIGITS = 19  # what fits a signed 64-bit integer, as APIs and SQLite store one
_INT64 = 2**63


class _DuplicateKey(ValueError):
    pass


class _BadNumber(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _int64(text: str) -> int:
    # Checked before int() runs: converting thousands of digits is itself the cost.
    if len(text.lstrip("-")) > _MAX_INT_DIGITS or not -_INT64 <= (value := int(text)) < _INT64:
        raise _BadNumber
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf, which JSON cannot carry on
        raise _BadNumber
    return value


def json_depth_exceeds(raw: bytes, max_depth: int) -> bool:
    """Whether ``raw`` nests arrays/objects deeper than ``max_depth``, without parsing it.

    Only C-speed passes over bytes (no Python loop per byte, nothing kept per string): strings
    are blanked and brackets counted with an early exit, costing less than parsing the same
    body. So ``json.loads`` never recurses past the cap (deep in C it raises RecursionError).
    For a malformed body the count may be off; the parser refuses that body anyway.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = unescaped.translate(None, _NOT_QUOTES_OR_BRACKETS)
    if marks.count(b"[") + marks.count(b"{") <= max_depth:
        return False  # the common case: too few openings to nest that deep
    brackets = _STRING.sub(b"", marks).translate(None, _NOT_BRACKETS)
    depths = accumulate(map(_DEPTH_STEP.__getitem__, brackets))
    return next(filter(max_depth.__lt__, depths), None) is not None


def _lone_surrogate_at(doc: Any) -> str | None | bool:
    """Where a string that is not valid Unicode (a lone surrogate) is: its parameter, None
    when that has no name (a key of the top-level object), False when there is none."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(doc, ())]
    while stack:
        node, loc = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if not _encodable(key):
                    return param_name(loc) or None
                stack.append((value, (*loc, key)))
        elif isinstance(node, list):
            stack.extend((value, (*loc, i)) for i, value in enumerate(node))
        elif isinstance(node, str) and not _encodable(node):
            return param_name(loc) or None
    return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json_object(raw: bytes, *, max_depth: int) -> dict[str, Any]:
    """A JSON object, strictly: every refusal is a 400 envelope, never another exception.

    The body's size is bounded before this runs (addons/validate.py).
    """
    if json_depth_exceeds(raw, max_depth):
        raise GatewayError(
            400, f"The request body nests deeper than {max_depth} levels.", "invalid_json"
        )
    try:
        doc = json.loads(
            raw,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_int=_int64,
            parse_float=_finite,
        )
    except _DuplicateKey as e:
        raise GatewayError(
            400, f"The request body repeats the key '{e.args[0]}'.", "invalid_json", param=e.args[0]
        ) from None
    except _BadNumber:
        raise GatewayError(
            400,
            "The request body holds a number out of range (integers must fit 64 bits, "
            "numbers must be finite).",
            "invalid_json",
        ) from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise GatewayError(400, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(doc, dict):
        raise GatewayError(400, "The request body must be a JSON object.", "invalid_json")
    if _SURROGATE_ESCAPE.search(raw) and (bad := _lone_surrogate_at(doc)) is not False:
        raise GatewayError(
            400,
            "The request body holds a string that is not valid Unicode.",
            "invalid_json",
            param=bad,
        )
    return doc


def param_name(loc: tuple[Any, ...]) -> str:
    """A location (pydantic's, or a JSON path) as OpenAI names a parameter: ``messages[0].x``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "str" or "[" in str(part):
            continue  # pydantic's union-branch labels ("str", "list[...]") are not parameter names
        else:
            out += ("." if out else "") + str(part)
    return out
