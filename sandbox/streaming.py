"""Server-sent events for ``stream: true``, one write per chunk, shaped like OpenAI's.

Each chunk is written (and drained) on its own so a proxy in front sees real incremental
delivery; ``stop_after_chunks`` cuts the TCP connection mid-stream to imitate an upstream crash.
Every event goes through ``emit`` (and the stream opens with ``begin``), so the Chutes flavour
(``sandbox/chutes/``) can encrypt the very same events without a second copy of this logic.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from teegate.sandbox.answers import Answer
from teegate.sandbox.behaviour import Behaviour

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class ChunkStream:
    """Writes one planned answer as a chat.completion.chunk stream."""

    def __init__(
        self,
        request: web.Request,
        head: dict[str, Any],
        answer: Answer,
        usage: dict[str, Any] | None,
        behaviour: Behaviour,
        tool_call_id: str,
    ) -> None:
        self.request = request
        self.head = head  # id, object, created, model
        self.answer = answer
        self.usage = usage  # None: no usage to report
        self.behaviour = behaviour
        self.tool_call_id = tool_call_id
        self.response: web.StreamResponse | None = None

    async def begin(self) -> None:
        """Called once the response is prepared, before the first event (a hook)."""

    async def emit(self, data: bytes) -> None:
        """Write one SSE event (``data: ...\\n\\n``) as produced by the upstream."""
        assert self.response is not None
        await self.response.write(data)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self.head, "choices": [choice]}

    def _first_delta(self) -> dict[str, Any]:
        if self.answer.tool_name is None:
            return {"role": "assistant", "content": ""}
        call = {
            "index": 0,
            "id": self.tool_call_id,
            "type": "function",
            "function": {"name": self.answer.tool_name, "arguments": ""},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def _piece_delta(self, piece: str) -> dict[str, Any]:
        if self.answer.tool_name is None:
            return {"content": piece}
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}

    async def send(self) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(self.request)
        self.response = response
        await self.begin()
        b = self.behaviour
        delay = b.chunk_delay_ms / 1000
        await self.emit(_event(self._chunk(self._first_delta())))
        pieces = self.answer.pieces
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            if b.stop_after_chunks is not None and i >= b.stop_after_chunks:
                return self._abort(response)
            if b.hold_after_chunks is not None and i == b.hold_after_chunks:
                await self._hold()
            if delay:
                await asyncio.sleep(delay)
            chunk = self._chunk(
                self._piece_delta(piece), self.answer.finish_reason if i == last else None
            )
            if i == last and self.usage is not None and b.usage_with_choices:
                chunk["usage"] = self.usage
            await self.emit(_event(chunk))
        if b.stop_after_chunks is not None and len(pieces) <= b.stop_after_chunks:
            return self._abort(response)
        if self.usage is not None and not b.usage_with_choices:
            await self.emit(_event({**self.head, "choices": [], "usage": self.usage}))
        await self.emit(DONE)
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
