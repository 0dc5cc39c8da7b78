"""The chat completion request, as the gateway understands it.

Parsing is strict (duplicate keys, NaN and non-objects are refused) and the
model is pydantic-validated; what goes upstream is re-serialized from the
parsed object, so no parser differential can carry a different model past the
gate. Fields the gateway does not interpret are kept as the client sent them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from addons.errors import GatewayError

MAX_BODY_BYTES = 16 * 1024 * 1024


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def output_budget(self) -> int:
        """The most completion tokens this request may produce."""
        budget = self.max_completion_tokens or self.max_tokens
        assert budget is not None, "defaults are applied at parse time"
        return budget * (self.n or 1)

    @property
    def wants_json(self) -> bool:
        kind = (self.response_format or {}).get("type")
        return kind in ("json_object", "json_schema")

    @property
    def wants_tools(self) -> bool:
        return bool(self.tools) or (self.tool_choice is not None and self.tool_choice != "none")

    def upstream_body(self, *, include_usage: bool) -> bytes:
        """The exact bytes sent upstream: the parsed request, re-serialized."""
        body = self.model_dump(mode="json", exclude_unset=True, by_alias=True)
        if body.get("stream"):
            opts = dict(body.get("stream_options") or {})
            if include_usage:
                opts["include_usage"] = True
            body["stream_options"] = opts
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BODY_BYTES:
        raise GatewayError(413, "The request body is larger than 16 MiB.", "request_too_large")
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as e:
        raise GatewayError(
            400, f"The request body repeats the key '{e.args[0]}'.", "invalid_json", param=e.args[0]
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(400, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(doc, dict):
        raise GatewayError(400, "The request body must be a JSON object.", "invalid_json")
    return doc


def parse_chat_request(
    raw: bytes, *, max_tokens: int, temperature: float, top_p: float
) -> ChatRequest:
    doc = parse_json_object(raw)
    try:
        req = ChatRequest.model_validate(doc)
    except ValidationError as e:
        raise _as_gateway_error(e) from None
    if req.max_tokens is None and req.max_completion_tokens is None:
        req.max_tokens = max_tokens
    # An explicit null means "the default" in OpenAI's API, like an absent field.
    if req.temperature is None:
        req.temperature = temperature
    if req.top_p is None:
        req.top_p = top_p
    return req


def _as_gateway_error(e: ValidationError) -> GatewayError:
    """The first validation error, as OpenAI reports it: message plus ``param``.

    Built from pydantic's location and message only, never the input value
    (which could be part of a prompt).
    """
    err = e.errors(include_url=False, include_input=False, include_context=False)[0]
    param = _param_name(err["loc"])
    if err["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {err['msg']}."
    return GatewayError(
        400,
        message,
        "invalid_value" if err["type"] != "missing" else "missing_required_parameter",
        param=param,
    )


def _param_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "str" or "[" in str(part):
            continue  # pydantic's union-branch labels ("str", "list[...]") are not parameter names
        else:
            out += ("." if out else "") + str(part)
    return out
