"""The sandbox's whole mutable state, kept in one object (``app["state"]``).

The served catalog is rebuilt (and pre-serialised) only when behaviour changes, so the hot paths
(``GET /v1/models``, chat completions) do no per-request catalog work.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from teegate.sandbox.behaviour import Behaviour
from teegate.sandbox.catalog_rows import malformed_rows
from teegate.sandbox.recording import RequestLog

CHAT_LOG_SIZE = 200


class SandboxState:
    """Catalog, behaviour switches and request counters of one sandbox process."""

    def __init__(self, all_rows: dict[str, dict[str, Any]], baseline: Behaviour) -> None:
        # Every model the upstream can answer for, whatever the catalog currently shows.
        self.all_rows = all_rows
        self.baseline = baseline
        self.behaviour = baseline
        # id -> row as served by /v1/models (after flags and removals).
        self.models: dict[str, dict[str, Any]] = {}
        self.models_body = b""
        self.total = 0
        self.by_route: Counter[str] = Counter()
        self.chat_log: deque[dict[str, Any]] = deque(maxlen=CHAT_LOG_SIZE)
        self.requests = RequestLog()  # every non-control request, as received
        self.completion_counter = 0
        self.held = 0  # streams currently waiting for a release
        self.release_event = asyncio.Event()
        # A flavour's own counters (merged into stats) and what it clears on reset.
        self.extra_stats: list[Callable[[], dict[str, Any]]] = []
        self.on_reset: list[Callable[[], None]] = []
        self._rebuild()

    def release(self) -> None:
        """Let every held stream go on (see ``Behaviour.hold_after_chunks``)."""
        self.release_event.set()
        self.release_event = asyncio.Event()

    def set_behaviour(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self._rebuild()

    def reset(self) -> None:
        """Back to the command-line behaviour, with every counter at zero."""
        self.total = 0
        self.by_route.clear()
        self.chat_log.clear()
        self.requests.clear()
        self.completion_counter = 0
        for clear in self.on_reset:
            clear()
        self.release()
        self.set_behaviour(self.baseline)

    def next_completion_id(self) -> str:
        self.completion_counter += 1
        return f"chatcmpl-sbx-{self.completion_counter}"

    def count(self, route: str) -> None:
        self.total += 1
        self.by_route[route] += 1

    def stats(self, since: int = 0) -> dict[str, Any]:
        """Counters and records; ``requests`` only after the ``since``-th request."""
        stats: dict[str, Any] = {
            "total": self.total,
            "by_route": dict(self.by_route),
            "chat": list(self.chat_log),
            "requests": self.requests.entries(since),
            "requests_seen": self.requests.seen,
            "held": self.held,
        }
        for extra in self.extra_stats:
            stats |= extra()
        return stats

    def _rebuild(self) -> None:
        b = self.behaviour
        hidden = set(b.remove_models)
        models: dict[str, dict[str, Any]] = {}
        for model_id, row in self.all_rows.items():
            if model_id in hidden:
                continue
            if model_id in b.flags:
                row = {**row, "confidential_compute": b.flags[model_id]}
            models[model_id] = row
        self.models = models
        data: list[Any] = list(models.values())
        if b.malformed_rows:
            data += malformed_rows()
        self.models_body = json.dumps({"object": "list", "data": data}).encode()
