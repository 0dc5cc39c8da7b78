"""``POST /v1/chat/completions``: validate, record, then answer plainly or as a stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from teegate.sandbox.answers import (
    Answer,
    BadRequest,
    count_prompt_tokens,
    plan_answers,
    requested_logprobs,
    token_logprobs,
    validate_messages,
)
from teegate.sandbox.errors import error_response
from teegate.sandbox.state import SandboxState
from teegate.sandbox.streaming import ChunkStream


def _usage(
    prompt_tokens: int, answers: list[Answer], cached: int, completion: int | None = None
) -> dict[str, Any]:
    generated = sum(a.generated for a in answers)
    completion = generated if completion is None else completion
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    reasoning = sum(len(a.reasoning) for a in answers)
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def _message(answer: Answer, tool_call_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text}
    if answer.tool_name is not None:
        call = {
            "id": tool_call_id,
            "type": "function",
            "function": {"name": answer.tool_name, "arguments": answer.text},
        }
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
    if answer.reasoning:
        message["reasoning_content"] = "".join(answer.reasoning)
    return message


@dataclass(frozen=True)
class Reply:
    """One planned chat answer (``n`` choices), before it is sent (plainly, streamed, or
    encrypted)."""

    body: dict[str, Any]  # the request, as the model received it
    head: dict[str, Any]  # id, object, created, model (the chunk object for streams)
    answers: list[Answer]
    usage: dict[str, Any] | None
    tool_call_id: str
    completion_id: str
    top_logprobs: int | None  # None: the request did not ask for logprobs

    @property
    def answer(self) -> Answer:
        return self.answers[0]

    def call_id(self, index: int) -> str:
        """Choice 0 keeps the plain id (tests know it); the others get their own."""
        return self.tool_call_id if index == 0 else f"{self.tool_call_id}_{index}"

    def logprobs(self, answer: Answer) -> dict[str, Any] | None:
        if self.top_logprobs is None:
            return None
        content = None if answer.tool_name else token_logprobs(answer.pieces, self.top_logprobs)
        return {"content": content, "refusal": None}

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def stream_usage(self) -> dict[str, Any] | None:
        """The usage a stream reports: only when ``stream_options.include_usage`` asks."""
        options = self.body.get("stream_options")
        wants = isinstance(options, dict) and options.get("include_usage") is True
        return self.usage if wants else None

    def payload(self) -> dict[str, Any]:
        """The non-streamed ``chat.completion`` object."""
        choices = [
            {
                "index": i,
                "message": _message(answer, self.call_id(i)),
                "logprobs": self.logprobs(answer),
                "finish_reason": answer.finish_reason,
            }
            for i, answer in enumerate(self.answers)
        ]
        payload: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion",
            **self.head,
            "choices": choices,
        }
        if self.usage is not None:
            payload["usage"] = self.usage
        return payload


def plan_reply(state: SandboxState, body: Any, chunks: int) -> Reply | web.Response:
    """Validate ``body`` and plan its answer (raises BadRequest; a 404 comes back as a
    response). Shared by the plain route and the Chutes flavour's ``/e2e/invoke``."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required", "model")
    messages = validate_messages(body)
    if model not in state.all_rows:
        return error_response(
            404, f"The model '{model}' does not exist", "model_not_found", "model"
        )
    features = state.all_rows[model].get("supported_features") or []
    answers = plan_answers(body, model, chunks, "reasoning" in features)
    completion_id = state.next_completion_id()
    tool_call_id = f"call_sbx_{state.completion_counter}"
    behaviour = state.behaviour
    usage = (
        None
        if behaviour.omit_usage
        else _usage(
            count_prompt_tokens(messages),
            answers,
            behaviour.cached_tokens,
            behaviour.usage_completion_tokens,
        )
    )
    head: dict[str, Any] = {"created": int(time.time()), "model": behaviour.answer_model or model}
    if body.get("stream") is True:
        head = {"id": completion_id, "object": "chat.completion.chunk", **head}
    top = requested_logprobs(body)
    return Reply(body, head, answers, usage, tool_call_id, completion_id, top)


class ChatCompletions:
    """The chat handler; ``chunks`` is the number of pieces of a full plain answer."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    async def handle(self, request: web.Request) -> web.StreamResponse:
        state: SandboxState = request.app["state"]
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        state.chat_log.append(
            {"headers": {k.lower(): v for k, v in request.headers.items()}, "body": body}
        )
        behaviour = state.behaviour
        if behaviour.delay_ms:
            await asyncio.sleep(behaviour.delay_ms / 1000)
        if behaviour.status is not None:
            return error_response(
                behaviour.status, "sandbox: forced error status", "sandbox_forced"
            )
        try:
            reply = plan_reply(state, body, self.chunks)
        except BadRequest as e:
            return error_response(400, e.message, "invalid_request", e.param)
        if isinstance(reply, web.Response):
            return reply
        signatures = request.app.get("signatures")
        model = str(body.get("model"))
        if reply.stream:
            stream = ChunkStream(request, reply, state.behaviour)
            response = await stream.send()
            if stream.completed and signatures is not None:
                digest = stream.sent.hexdigest()
                signatures.record(reply.completion_id, model, _sha256(raw), digest)
            return response
        payload = json.dumps(reply.payload()).encode()
        if signatures is not None:
            signatures.record(reply.completion_id, model, _sha256(raw), _sha256(payload))
        return web.Response(body=payload, content_type="application/json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
