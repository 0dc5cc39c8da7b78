"""The chat completion request, as the gateway understands it, and what goes upstream.

Parsing is strict (duplicate keys, NaN and non-objects are refused) and the
model is pydantic-validated. What goes upstream is *built*, never passed
through: every top-level field must be on an allow-list (OpenAI's chat
completion fields plus the sampling extensions open-model servers accept; the
operator may add more, never one of :data:`NEVER_ALLOWED`), every message key
on another, and the body is re-serialized from the parsed object, so no parser
differential and no unknown field (a fallback model, an endpoint, a key, a
beam search that multiplies the work) can reach the upstream.

One output budget: ``max_tokens`` and ``max_completion_tokens`` name the same
limit, the reservation covers it times ``n``, and the upstream receives exactly
that limit in both fields, so it cannot read a larger one than was paid for.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from teegate.addons.errors import GatewayError
from teegate.addons.jsonbody import param_name, parse_json_object

MAX_N = 128

# OpenAI's Chat Completions request fields (API reference, 2025-2026) that mean the same on an
# open-model server. Left out on purpose: ``store``/``metadata`` (ask the provider to keep the
# conversation), ``service_tier`` (a different, differently priced processing route),
# ``web_search_options`` (sends the conversation to a search service), ``audio``/``modalities``/
# ``prediction`` (no open-model server implements them; ``prediction`` is billed differently).
OPENAI_FIELDS = frozenset(
    {
        "model",
        "messages",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "response_format",
        "reasoning_effort",
        "verbosity",
        "user",
        "safety_identifier",
        "prompt_cache_key",
    }
)

# Sampling and decoding extensions of vLLM / SGLang that users of open models rely on. None
# raises the work past the paid budget (``min_tokens`` is checked against it) or names code,
# templates, adapters or endpoints on the operator's side.
OPEN_MODEL_FIELDS = frozenset(
    {
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "no_stop_trim",
        "chat_template_kwargs",
        "continue_final_message",
        "add_generation_prompt",
        "separate_reasoning",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_whitespace_pattern",
        "structured_outputs",
        "regex",
        "ebnf",
        "cache_salt",
    }
)

ALLOWED_FIELDS: frozenset[str] = OPENAI_FIELDS | OPEN_MODEL_FIELDS
"""Top-level body fields accepted by default; ``[request] extra_fields`` may add others."""

NEVER_ALLOWED: frozenset[str] = frozenset(
    {
        # pick, route or fall back between models, providers or endpoints (LiteLLM, OpenRouter,
        # gateways' own conventions): the attested model is the only one a prompt may reach
        "models",
        "model_list",
        "route",
        "router",
        "routing",
        "provider",
        "providers",
        "fallback",
        "fallbacks",
        "fallback_models",
        "context_window_fallbacks",
        "api_base",
        "base_url",
        "endpoint",
        "url",
        "deployment_id",
        "engine",
        "custom_llm_provider",
        "transforms",
        "kv_transfer_params",
        # keys, versions and raw pass-through of request parts
        "api_key",
        "api_version",
        "organization",
        "extra_body",
        "extra_headers",
        "extra_query",
        "headers",
        "mock_response",
        # multiply generation past budget x n
        "best_of",
        "use_beam_search",
        "length_penalty",
        # run code, templates or adapters chosen by the client on the operator's side
        "chat_template",
        "logits_processors",
        "lora_request",
        "lora_path",
        "guided_decoding_backend",
        "mm_processor_kwargs",
        "tool_parser",
        "priority",
    }
)
"""Refused whatever the configuration says (a config listing one does not start)."""

assert not ALLOWED_FIELDS & NEVER_ALLOWED


class Message(BaseModel):
    """One message; its keys are allow-listed (content parts and tool calls stay loose).

    ``reasoning_content`` is what DeepSeek-style and vLLM reasoning models return and what
    multi-turn clients send back; ``audio`` (a reference to audio stored at OpenAI) is not
    accepted: no open-model server has it.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    reasoning_content: str | None = None


MESSAGE_FIELDS: frozenset[str] = frozenset(Message.model_fields)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatRequest(BaseModel):
    """Typed where the gateway interprets a field; other allow-listed fields kept as sent."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    _allowed: frozenset[str] = PrivateAttr(default=ALLOWED_FIELDS)

    @property
    def budget(self) -> int:
        """Completion tokens per choice: the one limit the upstream receives."""
        budget = self.max_completion_tokens or self.max_tokens
        assert budget is not None, "defaults are applied at parse time"
        return budget

    @property
    def output_budget(self) -> int:
        """The most completion tokens this request may produce (all choices)."""
        return self.budget * (self.n or 1)

    @property
    def wants_json(self) -> bool:
        kind = (self.response_format or {}).get("type")
        return kind in ("json_object", "json_schema")

    @property
    def wants_tools(self) -> bool:
        return bool(self.tools) or (self.tool_choice is not None and self.tool_choice != "none")

    def upstream_body(self, *, include_usage: bool) -> bytes:
        """The exact bytes sent upstream: allow-listed fields of the parsed request, with
        the paid budget in both limit fields (servers honour one or the other)."""
        allowed = self._allowed - NEVER_ALLOWED
        dumped = self.model_dump(mode="json", exclude_unset=True)
        body = {k: v for k, v in dumped.items() if k in allowed}
        body["max_tokens"] = body["max_completion_tokens"] = self.budget
        if body.get("stream"):
            opts = dict(body.get("stream_options") or {})
            if include_usage:
                opts["include_usage"] = True
            body["stream_options"] = opts
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def parse_chat_request(
    raw: bytes,
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    max_depth: int,
    extra_fields: frozenset[str] = frozenset(),
) -> ChatRequest:
    doc = parse_json_object(raw, max_depth=max_depth)
    allowed = (ALLOWED_FIELDS | extra_fields) - NEVER_ALLOWED
    for key in doc:
        if key not in allowed:
            raise unsupported_parameter(key)
    try:
        req = ChatRequest.model_validate(doc)
    except ValidationError as e:
        raise _as_gateway_error(e) from None
    req._allowed = allowed
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        if req.max_tokens != req.max_completion_tokens:
            raise GatewayError(
                400,
                "max_tokens and max_completion_tokens name the same limit; give one, "
                "or both with the same value.",
                "invalid_value",
                param="max_completion_tokens",
            )
    budget = req.max_completion_tokens or req.max_tokens or max_tokens
    req.max_tokens = req.max_completion_tokens = budget
    if req.min_tokens is not None and req.min_tokens > budget:
        raise GatewayError(
            400,
            f"Invalid value for 'min_tokens': it exceeds the completion limit ({budget}).",
            "invalid_value",
            param="min_tokens",
        )
    # An explicit null means "the default" in OpenAI's API, like an absent field.
    if req.temperature is None:
        req.temperature = temperature
    if req.top_p is None:
        req.top_p = top_p
    return req


def unsupported_parameter(name: str) -> GatewayError:
    """OpenAI's answer to an unknown argument, naming it (cut short: it is client input)."""
    shown = name if len(name) <= 64 else name[:64] + "..."
    return GatewayError(
        400,
        f"Unrecognized request argument supplied: {shown}",
        "unsupported_parameter",
        param=shown,
    )


def _as_gateway_error(e: ValidationError) -> GatewayError:
    """The first validation error, as OpenAI reports it: message plus ``param``.

    Built from pydantic's location and message only, never the input value
    (which could be part of a prompt).
    """
    err = e.errors(include_url=False, include_input=False, include_context=False)[0]
    param = param_name(err["loc"])
    if err["type"] == "extra_forbidden":
        return unsupported_parameter(param)
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
