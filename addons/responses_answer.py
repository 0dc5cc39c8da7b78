"""A chat completion's answer as a Responses ``response`` object (pure functions, no flows).

The request half, and why the Responses API is served this way, is :mod:`.responses_api`; the
streamed answer is :mod:`.responses_stream`, which builds its items with the helpers here.
"""

from __future__ import annotations

from typing import Any

from teegate.addons.responses_api import ResponsesCall, new_id


def response_usage(usage: Any) -> dict[str, Any] | None:
    """A chat ``usage`` block in the Responses shape (None when there is none)."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cached = _count(prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0)
    reasoning = _count(
        completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0
    )
    total = usage.get("total_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": _count(total) if total is not None else prompt + completion,
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def response_logprobs(logprobs: Any) -> list[dict[str, Any]]:
    """Chat token logprobs in the Responses shape (``bytes`` always present)."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else logprobs
    if not isinstance(content, list):
        return []

    def one(t: dict[str, Any]) -> dict[str, Any]:
        token = t.get("token") if isinstance(t.get("token"), str) else ""
        raw = t.get("bytes")
        return {
            "token": token,
            "logprob": float(t.get("logprob") or 0.0),
            "bytes": raw if isinstance(raw, list) else list(token.encode()),
        }

    out = []
    for t in content:
        if isinstance(t, dict):
            top = [one(x) for x in t.get("top_logprobs") or () if isinstance(x, dict)]
            out.append(one(t) | {"top_logprobs": top})
    return out


INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_object(
    call: ResponsesCall,
    *,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    effective: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``response`` object: the answer, and what the request asked for echoed back.

    ``effective`` holds the sampling values the gateway applied (its defaults where the client
    gave none): the answer reports what was used, as OpenAI's does."""
    echo = call.echo
    applied = effective or {}
    return {
        "id": call.id,
        "object": "response",
        "created_at": call.created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": echo["instructions"],
        "max_output_tokens": applied.get("max_output_tokens", echo["max_output_tokens"]),
        "model": model,
        "output": output,
        "parallel_tool_calls": echo["parallel_tool_calls"],
        "previous_response_id": None,
        "reasoning": echo["reasoning"],
        "store": False,
        "temperature": applied.get("temperature"),
        "text": echo["text"],
        "tool_choice": echo["tool_choice"],
        "tools": echo["tools"],
        "top_logprobs": echo["top_logprobs"],
        "top_p": applied.get("top_p"),
        "truncation": "disabled",
        "usage": usage,
        "user": echo["user"],
        "safety_identifier": echo["safety_identifier"],
        "prompt_cache_key": echo["prompt_cache_key"],
        "metadata": echo["metadata"],
    }


def reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": new_id("rs"),
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def output_text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(content: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    return {
        "id": new_id("msg"),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def function_call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {
        "id": new_id("fc"),
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def response_from_chat(
    call: ResponsesCall, completion: dict[str, Any], effective: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A non-streamed chat completion as a Responses ``response`` object."""
    choices = completion.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    reason = INCOMPLETE_REASONS.get(finish) if isinstance(finish, str) else None
    item_status = "incomplete" if reason else "completed"
    output: list[dict[str, Any]] = []
    thought = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(thought, str) and thought:
        output.append(reasoning_item(thought, item_status))
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        logprobs = response_logprobs(choice.get("logprobs")) if call.logprobs else None
        content.append(output_text_part(text, logprobs))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "refusal", "refusal": refusal})
    if content:
        output.append(message_item(content, item_status))
    for tc in message.get("tool_calls") or ():
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            call_id = tc.get("id") if isinstance(tc.get("id"), str) else new_id("call")
            output.append(
                function_call_item(
                    call_id, str(fn.get("name") or ""), str(fn.get("arguments") or ""), item_status
                )
            )
    return response_object(
        call,
        model=str(completion.get("model") or call.echo["model"]),
        status="incomplete" if reason else "completed",
        output=output,
        usage=response_usage(completion.get("usage")),
        effective=effective,
        incomplete_reason=reason,
    )
