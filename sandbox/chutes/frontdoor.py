"""What the Chutes front door (the API that routes ``/e2e/invoke``) relayed, and whether any
of it was readable.

Why: the point of end-to-end encryption is that the operator of the API in front of the
enclave sees no prompt and no completion. This record is the test's view from that seat:
every request and response body relayed for ``/e2e/invoke``, bounded, and one verdict,
``plaintext_seen``: some relayed body (or SSE event) parsed as JSON with ``messages`` or
``choices``, or contained a marker a test registered (``POST /_sandbox/chutes/marker``).
The front door's own plaintext events (``{"usage": ...}``) and errors are expected and do
not count.
"""

from __future__ import annotations

import base64
import json
from collections import deque
from typing import Any

MAX_ENTRIES = 500
MAX_KEPT_BYTES = 256 * 1024  # per entry; the verdict is computed over every byte anyway
PLAINTEXT_KEYS = ("messages", "choices")


def _readable(data: bytes) -> bool:
    """A JSON document (or an SSE ``data:`` event) that carries chat content."""
    candidates = [data]
    if b"data:" in data:
        candidates += [line[5:].strip() for line in data.split(b"\n") if line.startswith(b"data:")]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) and any(k in value for k in PLAINTEXT_KEYS):
            return True
    return False


class Entry:
    """One relayed body (a request, or a whole response including every streamed event)."""

    def __init__(self, seq: int, direction: str, meta: dict[str, Any]) -> None:
        self.seq = seq
        self.direction = direction
        self.meta = meta
        self.size = 0
        self.kept = bytearray()

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "direction": self.direction,
            **self.meta,
            "size": self.size,
            "truncated": self.size > len(self.kept),
            "body_b64": base64.b64encode(bytes(self.kept)).decode(),
        }


class FrontDoor:
    """The bounded record of relayed bytes and the ``plaintext_seen`` verdict."""

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque(maxlen=MAX_ENTRIES)
        self.markers: list[bytes] = []
        self.plaintext_seen = False
        self._seq = 0

    def reset(self) -> None:
        self.entries.clear()
        self.markers.clear()
        self.plaintext_seen = False
        self._seq = 0

    def add_marker(self, marker: str) -> None:
        self.markers.append(marker.encode())

    def open(self, direction: str, **meta: Any) -> Entry:
        self._seq += 1
        entry = Entry(self._seq, direction, meta)
        self.entries.append(entry)
        return entry

    def relay(self, entry: Entry, data: bytes) -> None:
        """Record ``data`` as relayed in ``entry`` (one body, or one piece of a stream)."""
        entry.size += len(data)
        room = MAX_KEPT_BYTES - len(entry.kept)
        if room > 0:
            entry.kept += data[:room]
        if not self.plaintext_seen:
            self.plaintext_seen = _readable(data) or any(m in data for m in self.markers)

    def stats(self) -> dict[str, Any]:
        return {
            "plaintext_seen": self.plaintext_seen,
            "front_door": [e.to_json() for e in self.entries],
        }
