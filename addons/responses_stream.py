"""A chat completion stream as the Responses API's streaming events, event by event.

Nothing is buffered beyond one SSE event: each chat chunk becomes the Responses events it implies
as it arrives (``response.created`` and ``response.in_progress`` first, then for each output item
``response.output_item.added``, its deltas, its ``.done`` events and ``response.output_item.done``,
and ``response.completed`` (or ``response.incomplete``) with the usage last). Every event carries
``sequence_number`` and the ids its item was announced with, so the openai SDK's accumulator
(``client.responses.stream``) rebuilds the same ``response`` a non-streamed call returns.

Items are closed when the kind of output changes (reasoning, then text, then function calls, the
order models write them in); function calls stay open until the end, since parallel calls may
interleave their argument deltas.

An error the relay (or the upstream) wrote into the stream (``data: {"error": ...}``) ends the
answer: ``response.failed`` (whose ``response.error`` says what happened) then an ``error``
event that also carries the gateway's envelope under ``error``, on which OpenAI's SDKs raise as
they do for chat. A stream cut before its finish reason fails the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from teegate.addons.responses_answer import (
    INCOMPLETE_REASONS,
    function_call_item,
    message_item,
    output_text_part,
    reasoning_item,
    response_logprobs,
    response_object,
    response_usage,
)
from teegate.addons.responses_api import ResponsesCall
from teegate.addons.sse import SSESplitter


@dataclass
class _Item:
    """One output item being streamed: the item as announced, and what its deltas added."""

    item: dict[str, Any]
    index: int
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    refusal: str | None = None  # message items: a refusal part after the text
    open: bool = True


class ResponsesStream:
    """Chat completion SSE bytes in, Responses SSE bytes out (see the module docstring)."""

    def __init__(self, call: ResponsesCall, effective: dict[str, Any] | None = None) -> None:
        self._call = call
        self._effective = effective or {}
        self._model = str(call.echo.get("model") or "")
        self._sse = SSESplitter()
        self._seq = 0
        self._started = False
        self.ended = False
        self._items: list[_Item] = []
        self._current: _Item | None = None  # the open reasoning or message item
        self._calls: dict[int, _Item] = {}  # chat tool_call index -> function_call item
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    # -- input -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """The Responses events for these chat stream bytes (possibly none)."""
        return b"".join(self._on_event(e.data) for e in self._sse.feed(data))

    def close(self) -> bytes:
        """End of the chat stream: finish the answer if it has not finished."""
        out = b"".join(self._on_event(e.data) for e in self._sse.flush())
        if not self.ended:
            if self._finish is not None:
                out += self._complete()
            else:
                out += self._fail(
                    "server_error", "The upstream ended the answer before it was complete.", None
                )
        return out

    def abort(self) -> bytes:
        """End the answer with an error after a fault of the translation itself."""
        if self.ended:
            return b""
        self.ended = True
        err = {
            "message": "The gateway could not translate the rest of the answer.",
            "type": "api_error",
            "param": None,
            "code": "internal_error",
        }
        try:
            return self._event("error", code=err["code"], message=err["message"], error=err)
        except Exception:
            return b'event: error\ndata: {"type":"error","error":{"code":"internal_error"}}\n\n'

    def _on_event(self, data: str | None) -> bytes:
        if self.ended or data is None:
            return b""
        if data.strip() == "[DONE]":
            return self._complete() if self._finish is not None else b""
        try:
            chunk = json.loads(data)
        except ValueError:
            return b""
        if not isinstance(chunk, dict):
            return b""
        out = self._start()
        if "error" in chunk:
            return out + self._error(chunk)
        if isinstance(chunk.get("model"), str):
            self._model = chunk["model"]
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            out += self._on_choice(choices[0])
        usage = response_usage(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        return out

    def _on_choice(self, choice: dict[str, Any]) -> bytes:
        out = b""
        delta = choice.get("delta")
        if isinstance(delta, dict):
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(thought, str) and thought:
                out += self._reasoning(thought)
            text = delta.get("content")
            if isinstance(text, str) and text:
                logprobs = response_logprobs(choice.get("logprobs")) if self._call.logprobs else []
                out += self._text(text, logprobs)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                out += self._refusal(refusal)
            for tc in delta.get("tool_calls") or ():
                if isinstance(tc, dict):
                    out += self._tool_call(tc)
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            self._finish = finish
        return out

    # -- events ----------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n".encode("utf-8", "backslashreplace")

    def _response(self, status: str, **kw: Any) -> dict[str, Any]:
        return response_object(
            self._call, model=self._model, status=status, effective=self._effective, **kw
        )

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        snapshot = self._response("in_progress", output=[], usage=None)
        return self._event("response.created", response=snapshot) + self._event(
            "response.in_progress", response=snapshot
        )

    def _open(self, item: dict[str, Any]) -> _Item:
        entry = _Item(item=item, index=len(self._items))
        self._items.append(entry)
        return entry

    def _reasoning(self, text: str) -> bytes:
        out = b""
        cur = self._current
        if cur is None or cur.item["type"] != "reasoning":
            out += self._close_current()
            item = reasoning_item("", "in_progress")
            item["content"] = []
            cur = self._current = self._open(item)
            out += self._added(cur)
            out += self._part_event("response.content_part.added", cur, _reasoning_part(""))
        cur.text += text
        return out + self._event(
            "response.reasoning_text.delta", **self._where(cur), content_index=0, delta=text
        )

    def _message(self) -> tuple[_Item, bytes]:
        cur = self._current
        if cur is not None and cur.item["type"] == "message":
            return cur, b""
        out = self._close_current()
        cur = self._current = self._open(message_item([], "in_progress"))
        return cur, out + self._added(cur)

    def _text(self, text: str, logprobs: list[dict[str, Any]]) -> bytes:
        cur, out = self._message()
        if cur.refusal is not None:  # text after a refusal: a shape chat never produces
            return out
        if not cur.text:
            out += self._part_event("response.content_part.added", cur, output_text_part(""))
        cur.text += text
        cur.logprobs += logprobs
        return out + self._event(
            "response.output_text.delta",
            **self._where(cur),
            content_index=0,
            delta=text,
            logprobs=logprobs,
        )

    def _refusal(self, text: str) -> bytes:
        cur, out = self._message()
        index = 1 if cur.text else 0
        if cur.refusal is None:
            cur.refusal = ""
            out += self._part_event(
                "response.content_part.added", cur, _refusal_part(""), content_index=index
            )
        cur.refusal += text
        return out + self._event(
            "response.refusal.delta", **self._where(cur), content_index=index, delta=text
        )

    def _tool_call(self, tc: dict[str, Any]) -> bytes:
        index = tc.get("index") if isinstance(tc.get("index"), int) else 0
        fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
        out = b""
        entry = self._calls.get(index)
        if entry is None:
            out += self._close_current()
            call_id = tc.get("id") if isinstance(tc.get("id"), str) else f"call_{index}"
            name = fn.get("name") if isinstance(fn.get("name"), str) else ""
            entry = self._calls[index] = self._open(
                function_call_item(call_id, name, "", "in_progress")
            )
            out += self._added(entry)
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            entry.text += args
            out += self._event(
                "response.function_call_arguments.delta", **self._where(entry), delta=args
            )
        return out

    def _added(self, entry: _Item) -> bytes:
        return self._event("response.output_item.added", output_index=entry.index, item=entry.item)

    def _where(self, entry: _Item) -> dict[str, Any]:
        return {"item_id": entry.item["id"], "output_index": entry.index}

    def _part_event(
        self, kind: str, entry: _Item, part: dict[str, Any], content_index: int = 0
    ) -> bytes:
        return self._event(kind, **self._where(entry), content_index=content_index, part=part)

    # -- closing ---------------------------------------------------------------------------

    def _close_current(self) -> bytes:
        cur, self._current = self._current, None
        return self._close(cur) if cur is not None else b""

    def _close(self, entry: _Item, status: str = "completed") -> bytes:
        if not entry.open:
            return b""
        entry.open = False
        item = entry.item
        item["status"] = status
        out = b""
        where = self._where(entry)
        if item["type"] == "reasoning":
            part = _reasoning_part(entry.text)
            item["content"] = [part]
            out += self._event(
                "response.reasoning_text.done", **where, content_index=0, text=entry.text
            )
            out += self._part_event("response.content_part.done", entry, part)
        elif item["type"] == "message":
            parts = []
            if entry.text:
                part = output_text_part(entry.text, entry.logprobs)
                parts.append(part)
                out += self._event(
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=entry.text,
                    logprobs=entry.logprobs,
                )
                out += self._part_event("response.content_part.done", entry, part)
            if entry.refusal is not None:
                part = _refusal_part(entry.refusal)
                index = len(parts)
                parts.append(part)
                out += self._event(
                    "response.refusal.done", **where, content_index=index, refusal=entry.refusal
                )
                out += self._part_event("response.content_part.done", entry, part, index)
            item["content"] = parts
        else:
            item["arguments"] = entry.text
            out += self._event(
                "response.function_call_arguments.done",
                **where,
                name=item["name"],
                arguments=entry.text,
            )
        return out + self._event("response.output_item.done", output_index=entry.index, item=item)

    def _close_all(self, status: str) -> bytes:
        self._current = None
        return b"".join(self._close(entry, status) for entry in self._items)

    def _complete(self) -> bytes:
        self.ended = True
        reason = INCOMPLETE_REASONS.get(self._finish or "")
        status = "incomplete" if reason else "completed"
        out = self._start() + self._close_all(status)
        response = self._response(
            status,
            output=[e.item for e in self._items],
            usage=self._usage,
            incomplete_reason=reason,
        )
        return out + self._event(f"response.{status}", response=response)

    def _fail(self, code: str, message: str, envelope: dict[str, Any] | None) -> bytes:
        self.ended = True
        out = self._start() + self._close_all("incomplete")
        response = self._response(
            "failed",
            output=[e.item for e in self._items],
            usage=self._usage,
            error={"code": "server_error", "message": message},
        )
        out += self._event("response.failed", response=response)
        err = envelope or {"message": message, "type": "api_error", "param": None, "code": code}
        return out + self._event(
            "error", code=code, message=message, param=err.get("param"), error=err
        )

    def _error(self, chunk: dict[str, Any]) -> bytes:
        err = chunk.get("error")
        envelope = err if isinstance(err, dict) else {}
        message = envelope.get("message")
        code = envelope.get("code")
        return self._fail(
            code if isinstance(code, str) else "server_error",
            message if isinstance(message, str) else "The answer failed.",
            envelope or None,
        )


def _reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def _refusal_part(text: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": text}
