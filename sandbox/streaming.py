"""Server-sent events for ``stream: true``, one write per chunk, shaped like OpenAI's.

Each chunk is written (and drained) on its own so a proxy in front sees real incremental
delivery; ``stop_after_chunks`` cuts the TCP connection mid-stream to imitate an upstream crash.
Every event goes through ``emit`` (and the stream opens with ``begin``), so the Chutes flavour
(``sandbox/chutes/``) can encrypt the very same events without a second copy of this logic.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

from aiohttp import web

from teegate.sandbox.answers import Answer, token_logprobs
from teegate.sandbox.behaviour import Behaviour

if TYPE_CHECKING:
    from teegate.sandbox.chat import Reply

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class ChunkStream:
    """Writes one planned reply (``n`` choices) as a chat.completion.chunk stream: per choice a
    role delta, its reasoning pieces, then its content or tool-argument pieces (choices
    interleaved piece by piece, as a batched model sends them)."""

    def __init__(self, request: web.Request, reply: Reply, behaviour: Behaviour) -> None:
        self.request = request
        self.reply = reply
        self.head = reply.head  # id, object, created, model
        self.usage = reply.stream_usage  # None: no usage to report
        self.behaviour = behaviour
        self.response: web.StreamResponse | None = None
        self.sent = hashlib.sha256()  # every byte of the event stream, for the signature
        self.completed = False  # reached [DONE]: only then is it signed

    async def begin(self) -> None:
        """Called once the response is prepared, before the first event (a hook)."""

    async def emit(self, data: bytes) -> None:
        """Write one SSE event (``data: ...\\n\\n``) as produced by the upstream."""
        assert self.response is not None
        self.sent.update(data)
        await self.response.write(data)

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        finish: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self.head, "choices": [choice]}

    def _first_delta(self, index: int, answer: Answer) -> dict[str, Any]:
        if answer.tool_name is None:
            return {"role": "assistant", "content": ""}
        call = {
            "index": 0,
            "id": self.reply.call_id(index),
            "type": "function",
            "function": {"name": answer.tool_name, "arguments": ""},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def _steps(self, index: int, answer: Answer) -> list[dict[str, Any]]:
        """The chunks of one choice after its role delta; the last one carries the finish."""
        steps = [self._chunk(index, {"reasoning_content": p}) for p in answer.reasoning]
        top = self.reply.top_logprobs
        for j, piece in enumerate(answer.pieces):
            if answer.tool_name is not None:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                steps.append(self._chunk(index, delta))
                continue
            logprobs = None
            if top is not None:
                content = token_logprobs(answer.pieces, top)[j : j + 1]
                logprobs = {"content": content, "refusal": None}
            steps.append(self._chunk(index, {"content": piece}, logprobs=logprobs))
        if not steps:
            steps.append(self._chunk(index, {}))
        steps[-1]["choices"][0]["finish_reason"] = answer.finish_reason
        return steps

    async def send(self) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(self.request)
        self.response = response
        await self.begin()
        b = self.behaviour
        delay = b.chunk_delay_ms / 1000
        answers = self.reply.answers
        for index, answer in enumerate(answers):
            await self.emit(_event(self._chunk(index, self._first_delta(index, answer))))
        per_choice = [self._steps(i, a) for i, a in enumerate(answers)]
        ordered = [c for row in zip_longest(*per_choice) for c in row if c is not None]
        last = len(ordered) - 1
        for i, chunk in enumerate(ordered):
            if b.stop_after_chunks is not None and i >= b.stop_after_chunks:
                return self._abort(response)
            if b.hold_after_chunks is not None and i == b.hold_after_chunks:
                await self._hold()
            if delay:
                await asyncio.sleep(delay)
            if i == last and self.usage is not None and b.usage_with_choices:
                chunk["usage"] = self.usage
            await self.emit(_event(chunk))
        if b.stop_after_chunks is not None and len(ordered) <= b.stop_after_chunks:
            return self._abort(response)
        if self.usage is not None and not b.usage_with_choices:
            await self.emit(_event({**self.head, "choices": [], "usage": self.usage}))
        await self.emit(DONE)
        self.completed = True
        await response.write_eof()
        return response

    async def _hold(self) -> None:
        state = self.request.app["state"]
        event = state.release_event
        state.held += 1
        try:
            await event.wait()
        finally:
            state.held -= 1

    def _abort(self, response: web.StreamResponse) -> web.StreamResponse:
        """Close the socket after what was written: no [DONE], no chunked terminator."""
        transport = self.request.transport
        if transport is not None:
            transport.close()
        return response
