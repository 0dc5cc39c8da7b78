"""An incremental Server-Sent Events splitter for chat completion streams.

Pieces from the network can split an event anywhere, so bytes are buffered to
an event boundary (a blank line: LF LF, CRLF CRLF or CR CR) and each complete
event is handed on with its raw bytes, so what is relayed is exactly what the
upstream wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes  # the event's bytes, terminator included
    data: str | None  # joined data lines, or None for comment-only events


class SSESplitter:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[Event]:
        self._buf += chunk
        while True:
            m = _BOUNDARY.search(self._buf)
            if m is None:
                # A lone trailing CR may be the first half of CRLF: wait for more.
                return
            if m.group() == b"\r\r" and m.end() == len(self._buf):
                return
            raw, self._buf = self._buf[: m.end()], self._buf[m.end() :]
            yield Event(raw=raw, data=_data(raw[: m.start()]))

    def flush(self) -> Iterator[Event]:
        """The unterminated tail at end of stream, if any."""
        if self._buf:
            raw, self._buf = self._buf, b""
            yield Event(raw=raw, data=_data(raw.rstrip(b"\r\n")))


def _data(block: bytes) -> str | None:
    parts: list[str] = []
    for line in _LINE.split(block):
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            parts.append(value.decode("utf-8", "replace"))
    return "\n".join(parts) if parts else None
