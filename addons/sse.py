"""An incremental Server-Sent Events splitter for chat completion streams.

Pieces from the network can split an event anywhere, so bytes are buffered to
an event boundary (a blank line: LF LF, CRLF CRLF or CR CR) and each complete
event is handed on with its raw bytes, so what is relayed is exactly what the
upstream wrote.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


class Event(NamedTuple):
    """One event (a tuple: made for every chunk of every stream, where a frozen dataclass's
    ``__init__`` cost more than the split)."""

    raw: bytes  # the event's bytes, terminator included
    data: str | None  # joined data lines, or None for comment-only events


class SSESplitter:
    def __init__(self) -> None:
        self._buf = b""

    def lone_data(self, chunk: bytes) -> bytes | None:
        """The payload of ``chunk`` if it is exactly one event of one ``data: `` line,
        LF-terminated, with nothing buffered before it (how vLLM and OpenAI write each chunk);
        else None, and the chunk is for :meth:`feed`. No buffer, no Event, no decoding: the
        usual read of a stream, relayed for every chunk of every stream."""
        if (
            not self._buf
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and b"\r" not in chunk
        ):
            return chunk[6:-2]
        return None

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by ``chunk`` (the rest is kept for the next one)."""
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            return self._feed_any(buf)
        # Fast path, LF only (what vLLM and OpenAI send): bytes.find, not the regex. It runs
        # for every chunk of every stream, and was ~5% of the gateway's CPU under streams.
        events: list[Event] = []
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            events.append(Event(raw=buf[start : end + 2], data=_data(buf[start:end])))
            start = end + 2
        self._buf = buf[start:] if start else buf
        return events

    def _feed_any(self, buf: bytes) -> list[Event]:
        events: list[Event] = []
        while True:
            m = _BOUNDARY.search(buf)
            if m is None:
                break
            # A lone trailing CR may be the first half of CRLF: wait for more.
            if m.group() == b"\r\r" and m.end() == len(buf):
                break
            events.append(Event(raw=buf[: m.end()], data=_data(buf[: m.start()])))
            buf = buf[m.end() :]
        self._buf = buf
        return events

    def flush(self) -> list[Event]:
        """The unterminated tail at end of stream, if any."""
        if not self._buf:
            return []
        raw, self._buf = self._buf, b""
        return [Event(raw=raw, data=_data(raw.rstrip(b"\r\n")))]


def _data(block: bytes) -> str | None:
    if block.startswith(b"data:") and b"\n" not in block and b"\r" not in block:
        value = block[6:] if block[5:6] == b" " else block[5:]  # one data line: the usual event
        return value.decode("utf-8", "replace")
    parts: list[str] = []
    for line in _LINE.split(block):
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            parts.append(value.decode("utf-8", "replace"))
    return "\n".join(parts) if parts else None
