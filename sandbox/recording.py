"""A record of every API request the sandbox receives, exactly as it arrived.

The sandbox stands in for the confidential upstream, so it is the one place a test can see what
the gateway really sent: method, raw path and query string, every header (duplicates and order
kept) and the body bytes. Hostile-client tests read it to prove nothing outside the gateway's
allow-lists ever left it. Control routes (``/_sandbox/*``) are not API traffic and are not
recorded.

Memory is bounded however hostile the traffic: at most ``MAX_ENTRIES`` entries, each body kept
up to ``MAX_BODY_BYTES`` (with its full size and a ``body_truncated`` flag), and the oldest
entries dropped once the kept bodies pass ``MAX_TOTAL_BYTES``. ``seen`` counts every request,
so a test can tell the record is complete (``seen == len(requests)``).
"""

from __future__ import annotations

import base64
import json
from collections import deque
from typing import Any

from aiohttp import web

MAX_ENTRIES = 2000
MAX_BODY_BYTES = 1024 * 1024
MAX_TOTAL_BYTES = 64 * 1024 * 1024


def _parse_json(raw: bytes) -> tuple[bool, Any]:
    """(parsed?, value): a deep or odd document is "not JSON" here, never an error."""
    try:
        return True, json.loads(raw)
    except (ValueError, RecursionError):
        return False, None


class RequestLog:
    """The bounded record; ``entries()`` is what ``/_sandbox/stats`` serves as ``requests``."""

    def __init__(self) -> None:
        self._entries: deque[tuple[dict[str, Any], int]] = deque(maxlen=MAX_ENTRIES)
        self._bytes = 0
        self.seen = 0

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        self.seen = 0

    async def record(self, request: web.Request) -> None:
        self.seen += 1
        target = request.raw_path
        path, sep, query = target.partition("?")
        entry: dict[str, Any] = {
            "seq": self.seen,
            "method": request.method,
            "target": target,
            "path": path,
            "query": query if sep else None,
            "version": f"{request.version.major}.{request.version.minor}",
            # latin-1 maps every byte to one character: nothing a client sent is lost or refused.
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        }
        try:
            raw = await request.read()  # cached by aiohttp: the handler reads the same bytes
        except web.HTTPException as e:  # larger than the app's client_max_size
            entry |= {"body_error": type(e).__name__, "body_size": None}
            self._append(entry, 0)
            return
        kept = raw[:MAX_BODY_BYTES]
        entry["body_size"] = len(raw)
        entry["body_truncated"] = len(kept) < len(raw)
        entry["body_b64"] = base64.b64encode(kept).decode("ascii")
        try:
            entry["body_text"] = kept.decode("utf-8")
        except UnicodeDecodeError:
            entry["body_text"] = None
        parsed, value = _parse_json(raw) if not entry["body_truncated"] else (False, None)
        entry["json_ok"] = parsed
        entry["json"] = value
        self._append(entry, len(kept))

    def _append(self, entry: dict[str, Any], size: int) -> None:
        if len(self._entries) == self._entries.maxlen:
            self._bytes -= self._entries[0][1]
        self._entries.append((entry, size))
        self._bytes += size
        while self._bytes > MAX_TOTAL_BYTES and len(self._entries) > 1:
            self._bytes -= self._entries.popleft()[1]

    def entries(self, since: int = 0) -> list[dict[str, Any]]:
        """The kept entries whose ``seq`` is greater than ``since``, oldest first."""
        return [entry for entry, _ in self._entries if entry["seq"] > since]
