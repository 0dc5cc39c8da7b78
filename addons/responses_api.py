"""OpenAI's Responses API, translated to and from a chat completion (pure functions, no flows).

Several frameworks now call ``POST /v1/responses`` by default. teegate answers it on the very path
chat completions take: the request is rewritten here into a chat completion *before* the
allow-list validator, the TEE and attestation gates, billing and the upstream rewrite run, so
every one of them applies unchanged and the upstream only ever sees ``POST /v1/chat/completions``.
The answer is translated back (:func:`response_from_chat`; streams in
:mod:`teegate.addons.responses_stream`).

The translation is as strict as the chat allow-list: a top-level field, an input item, a content
part or a tool this module does not map is a 400 naming it, never silently dropped. What teegate
refuses on purpose, and why:

* teegate stores nothing (confidentiality): ``previous_response_id``, ``conversation``, stored
  ``prompt`` templates, ``item_reference`` inputs, uploaded files (``file_id``) and
  ``background: true`` (which needs the answer kept to be polled) are refused with a 400 saying
  so. ``store`` is accepted whatever its value and every answer says ``store: false``: clients
  (the Vercel AI SDK among them) send ``store: true`` by default, and refusing it would break them
  for a promise teegate keeps anyway.
* Built-in tools (web search, file search, code interpreter, computer use, image generation, MCP,
  shells, ...) would run outside the attested model on OpenAI's side: 400 naming the tool.
* ``service_tier`` and ``truncation: "auto"`` are refused as for chat (another processing route;
  dropping input items the client sent).

``metadata`` is accepted, echoed in the answer and never sent upstream. (Chat refuses it because
there it is a request to the provider to keep the completion; here it is part of the returned
object only, kept for the length of the request.) ``reasoning`` items sent back in ``input`` become
the next assistant message's ``reasoning_content`` (what interleaved-thinking models read);
``include: ["reasoning.encrypted_content"]`` is accepted with nothing to include (open models'
reasoning is returned in plain text). The chat sampling fields Responses lacks (``seed``, ``stop``,
the penalties, the open-model extensions, ``[request] extra_fields``) pass through as they would on
a chat completion (:func:`passthrough_fields`), under the same allow-list.

Why this module is long: it is one allow-list. Every field, input item, content part and tool
of the Responses request is either mapped or refused here with a message naming it, and split
across modules that list would no longer be read (or reviewed) in one place.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from teegate.addons.errors import GatewayError
from teegate.addons.schema import (
    NEVER_ALLOWED,
    OPEN_MODEL_FIELDS,
    OPENAI_FIELDS,
    unsupported_parameter,
)

# Fields mapped onto the chat completion, or answered by the gateway itself.
MAPPED_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "top_logprobs",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "reasoning",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "include",
        "store",
        "metadata",
        "truncation",
        "background",
    }
)

# Fields that need a conversation, a prompt or an answer kept by the provider: refused (when
# not null) with the reason, rather than as merely unknown.
_NOTHING_STORED = {
    "previous_response_id": "teegate keeps no conversation (confidentiality): send the whole "
    "conversation in 'input' instead of 'previous_response_id'.",
    "conversation": "teegate keeps no conversation (confidentiality): send the whole "
    "conversation in 'input' instead of a 'conversation'.",
    "prompt": "teegate keeps no stored prompt templates (confidentiality): send the prompt in "
    "'instructions' and 'input'.",
}

BUILT_IN_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "code_interpreter",
        "computer",
        "computer_use_preview",
        "computer_use",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "custom",
        "tool_search",
        "namespace",
        "programmatic_tool_calling",
    }
)

_FUNCTION_TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})
_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status", "phase"})
_ROLES = ("user", "system", "developer", "assistant")
_INCLUDE_LOGPROBS = "message.output_text.logprobs"


def _bad(param: str, message: str, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, code, param=param)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass
class ResponsesCall:
    """What a Responses request asked for that the chat completion does not carry back:
    echoed in the answer, and the id and creation time every event of one answer shares."""

    echo: dict[str, Any]
    logprobs: bool = False
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))


# Chat sampling fields the Responses API lacks, passed on as they are (with the open-model
# extensions and the operator's ``[request] extra_fields``): a client that sets ``seed`` or
# ``top_k`` on a chat completion can set it here too, and the chat allow-list still applies.
CHAT_SAMPLING = frozenset({"seed", "stop", "frequency_penalty", "presence_penalty", "logit_bias"})


def passthrough_fields(extra_fields: frozenset[str] = frozenset()) -> frozenset[str]:
    """The chat fields a Responses request may carry as they are: never one this module
    builds, one of chat's own structural fields, or one :data:`NEVER_ALLOWED`."""
    wanted = OPEN_MODEL_FIELDS | CHAT_SAMPLING | extra_fields
    return wanted - NEVER_ALLOWED - (OPENAI_FIELDS - CHAT_SAMPLING) - MAPPED_FIELDS


def to_chat(
    doc: dict[str, Any], passthrough: frozenset[str] | None = None
) -> tuple[dict[str, Any], ResponsesCall]:
    """The chat completion body for a parsed Responses request, and what to echo back.

    Raises :class:`GatewayError` (400) for anything it does not map."""
    passthrough = passthrough_fields() if passthrough is None else passthrough
    chat: dict[str, Any] = {}
    for key in doc:
        if key in _NOTHING_STORED:
            if doc[key] is not None:
                raise _bad(key, _NOTHING_STORED[key], "unsupported_parameter")
        elif key in passthrough:
            chat[key] = doc[key]
        elif key not in MAPPED_FIELDS:
            raise unsupported_parameter(key)
    if doc.get("background") is True:
        raise _bad(
            "background",
            "Background responses need the answer stored to be polled, and teegate stores "
            "nothing (confidentiality): send the request without 'background'.",
            "unsupported_parameter",
        )
    if doc.get("truncation") not in (None, "disabled"):
        raise _bad(
            "truncation",
            "Only truncation 'disabled' is supported: teegate never drops input items.",
        )
    if "model" in doc:
        chat["model"] = doc["model"]
    instructions = doc.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions", "'instructions' must be a string.")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    messages += input_messages(doc.get("input"))
    if not any(m["role"] != "system" for m in messages):
        raise _bad("input", "Missing required parameter: 'input'.", "missing_required_parameter")
    chat["messages"] = messages
    for ours, theirs in (
        ("max_output_tokens", "max_completion_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("parallel_tool_calls", "parallel_tool_calls"),
        ("user", "user"),
        ("safety_identifier", "safety_identifier"),
        ("prompt_cache_key", "prompt_cache_key"),
    ):
        if doc.get(ours) is not None:
            chat[theirs] = doc[ours]
    budget = doc.get("max_output_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise _bad("max_output_tokens", "'max_output_tokens' must be an integer.")
    if budget is not None and budget < 1:
        raise _bad("max_output_tokens", "'max_output_tokens' must be at least 1.")
    if doc.get("stream") is not None:
        chat["stream"] = doc["stream"]
        if doc["stream"] is True:  # the usage the final event reports, and billing reads
            chat["stream_options"] = {"include_usage": True}
    _check_stream_options(doc.get("stream_options"))
    tools = doc.get("tools")
    if tools is not None:
        chat["tools"] = chat_tools(tools)
    if doc.get("tool_choice") is not None:
        chat["tool_choice"] = chat_tool_choice(doc["tool_choice"])
    text = _object(doc.get("text"), "text", {"format", "verbosity"})
    if text.get("format") is not None:
        fmt = response_format(text["format"])
        if fmt is not None:
            chat["response_format"] = fmt
    if text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]
    reasoning = _object(
        doc.get("reasoning"), "reasoning", {"effort", "summary", "generate_summary"}
    )
    if reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    logprobs = _logprobs(doc, chat)
    metadata = _metadata(doc.get("metadata"))
    echo = {
        "model": doc.get("model"),
        "instructions": instructions,
        "tools": tools or [],
        "tool_choice": doc.get("tool_choice") or "auto",
        "parallel_tool_calls": doc.get("parallel_tool_calls", True) is not False,
        "text": {"format": text.get("format") or {"type": "text"}}
        | ({"verbosity": text["verbosity"]} if text.get("verbosity") else {}),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
        if reasoning
        else None,
        "metadata": metadata,
        "user": doc.get("user"),
        "safety_identifier": doc.get("safety_identifier"),
        "prompt_cache_key": doc.get("prompt_cache_key"),
        "top_logprobs": doc.get("top_logprobs"),
        "max_output_tokens": budget,
    }
    return chat, ResponsesCall(echo=echo, logprobs=logprobs)


def _object(value: Any, param: str, keys: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(param, f"'{param}' must be an object.")
    for key in value:
        if key not in keys:
            raise unsupported_parameter(f"{param}.{key}")
    return value


def _check_stream_options(value: Any) -> None:
    # Obfuscation pads deltas against length side channels on OpenAI's side; accepted as a
    # preference with nothing to pad (no delta leaves this gateway other than to the client).
    _object(value, "stream_options", {"include_obfuscation"})


def _logprobs(doc: dict[str, Any], chat: dict[str, Any]) -> bool:
    include = doc.get("include")
    if include is not None and (
        not isinstance(include, list) or not all(isinstance(i, str) for i in include)
    ):
        raise _bad("include", "'include' must be a list of strings.")
    top = doc.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise _bad("top_logprobs", "'top_logprobs' must be an integer.")
    wanted = _INCLUDE_LOGPROBS in (include or ()) or bool(top)
    if wanted:
        chat["logprobs"] = True
        if top:
            chat["top_logprobs"] = top
    return wanted


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16:
        raise _bad("metadata", "'metadata' must be an object of at most 16 pairs.")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise _bad(
                "metadata",
                "'metadata' keys must be at most 64 characters, values strings of at most 512.",
            )
    return value


# -- input ----------------------------------------------------------------------------------


def input_messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages for ``input``: a string, or a list of message and function-call items."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _bad("input", "'input' must be a string or a list of items.")
    out: list[dict[str, Any]] = []
    reasoning: list[str] = []  # from reasoning items, for the next assistant message
    for i, item in enumerate(value):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(at, f"'{at}' must be an object.")
        kind = item.get("type", "message")
        if kind == "message":
            msg = _message(item, at)
            if msg["role"] == "assistant" and reasoning:
                msg["reasoning_content"] = "".join(reasoning)
                reasoning = []
            out.append(msg)
        elif kind == "function_call":
            call = _function_call(item, at)
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
            if reasoning:
                last["reasoning_content"] = last.get("reasoning_content", "") + "".join(reasoning)
                reasoning = []
        elif kind == "function_call_output":
            out.append(_function_output(item, at))
        elif kind == "reasoning":
            reasoning.append(_reasoning_text(item))
        elif kind == "item_reference":
            raise _bad(
                at,
                "teegate stores no items (confidentiality): send the item itself instead of "
                "an 'item_reference' (the Vercel AI SDK does with providerOptions.openai.store "
                "= false).",
                "unsupported_value",
            )
        else:
            raise _bad(
                f"{at}.type",
                f"Input items of type '{str(kind)[:64]}' are not supported: teegate serves "
                "messages, function calls and function call outputs.",
                "unsupported_value",
            )
    return out


def _message(item: dict[str, Any], at: str) -> dict[str, Any]:
    for key in item:
        if key not in _MESSAGE_KEYS:
            raise unsupported_parameter(f"{at}.{key}")
    role = item.get("role")
    if role not in _ROLES:
        raise _bad(f"{at}.role", f"'{at}.role' must be one of {', '.join(_ROLES)}.")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _bad(f"{at}.content", f"'{at}.content' must be a string or a list of parts.")
    if role == "assistant":
        return _assistant(content, at)
    return {
        "role": role,
        "content": [_input_part(p, f"{at}.content[{j}]") for j, p in enumerate(content)],
    }


def _assistant(parts: list[Any], at: str) -> dict[str, Any]:
    texts: list[str] = []
    refusal = None
    for j, part in enumerate(parts):
        where = f"{at}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("output_text", "input_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            refusal = part["refusal"]
        else:
            raise _bad(f"{where}.type", f"'{where}' must be an output_text or refusal part.")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if refusal is not None:
        msg["refusal"] = refusal
    return msg


def _input_part(part: Any, at: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "text", "output_text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{at}.text", f"'{at}.text' must be a string.")
        return {"type": "text", "text": text}
    if kind == "input_image":
        if part.get("file_id") is not None:
            raise _bad(
                f"{at}.file_id",
                "teegate stores no files (confidentiality): send the image as 'image_url' "
                "(a URL or a data: URL).",
                "unsupported_value",
            )
        url = part.get("image_url")
        if not isinstance(url, str):
            raise _bad(f"{at}.image_url", f"'{at}.image_url' must be a string.")
        image: dict[str, Any] = {"url": url}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise _bad(
        f"{at}.type",
        f"Content parts of type '{str(kind)[:64]}' are not supported: teegate serves "
        "input_text and input_image parts.",
        "unsupported_value",
    )


def _string(item: dict[str, Any], key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _bad(f"{at}.{key}", f"'{at}.{key}' must be a string.")
    return value


def _function_call(item: dict[str, Any], at: str) -> dict[str, Any]:
    for key in item:
        if key not in ("type", "call_id", "name", "arguments", "id", "status", "namespace"):
            raise unsupported_parameter(f"{at}.{key}")
    return {
        "id": _string(item, "call_id", at),
        "type": "function",
        "function": {
            "name": _string(item, "name", at),
            "arguments": _string(item, "arguments", at),
        },
    }


def _function_output(item: dict[str, Any], at: str) -> dict[str, Any]:
    for key in item:
        if key not in ("type", "call_id", "output", "id", "status"):
            raise unsupported_parameter(f"{at}.{key}")
    output = item.get("output")
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            where = f"{at}.output[{j}]"
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
                raise _bad(f"{where}.type", f"'{where}' must be an input_text part.")
            texts.append(_string(part, "text", where))
        output = "".join(texts)
    if not isinstance(output, str):
        raise _bad(f"{at}.output", f"'{at}.output' must be a string or a list of text parts.")
    return {"role": "tool", "tool_call_id": _string(item, "call_id", at), "content": output}


def _reasoning_text(item: dict[str, Any]) -> str:
    """The plain reasoning a reasoning item carries (its content, else its summary)."""
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list):
            text = "".join(
                p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
            if text:
                return text
    return ""


# -- tools and formats ----------------------------------------------------------------------


def chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Responses' flat function tools in chat's nested shape; a built-in tool is a 400."""
    if not isinstance(tools, list):
        raise _bad("tools", "'tools' must be a list.")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            shown = str(kind)[:64]
            why = (
                f"The built-in tool '{shown}' is not supported: it would run on the provider's "
                "side, outside the attested model. Only function tools are served."
                if kind in BUILT_IN_TOOLS
                else f"Tools of type '{shown}' are not supported: only function tools are served."
            )
            raise _bad(f"{at}.type", why, "unsupported_tool")
        for key in tool:
            if key not in _FUNCTION_TOOL_KEYS:
                raise unsupported_parameter(f"{at}.{key}")
        fn: dict[str, Any] = {"name": _string(tool, "name", at)}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                fn[key] = tool[key]
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        for key in choice:
            if key not in ("type", "name"):
                raise unsupported_parameter(f"tool_choice.{key}")
        return {"type": "function", "function": {"name": _string(choice, "name", "tool_choice")}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise _bad(
        "tool_choice",
        f"tool_choice '{str(kind)[:64]}' is not supported: use 'none', 'auto', 'required' or "
        "a function.",
        "unsupported_value",
    )


def response_format(fmt: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (None for plain text)."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        for key in fmt:
            if key not in ("type", "name", "schema", "strict", "description"):
                raise unsupported_parameter(f"text.format.{key}")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise _bad(
        "text.format.type",
        "text.format.type must be 'text', 'json_object' or 'json_schema'.",
        "unsupported_value",
    )


_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
    "logprobs": "top_logprobs",
}


def responses_param(param: str) -> str:
    """A refusal's ``param``, named as the Responses request names it (a chat field the
    gates refused came from a Responses field the client knows by another name)."""
    head = param.split("[", 1)[0].split(".", 1)[0]
    if head in _PARAMS:
        return _PARAMS[head]
    if head == "tools" and ".function." in param:
        return param.replace(".function.", ".", 1)
    return param
