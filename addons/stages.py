"""Per-flow bookkeeping shared by the request-path addons.

Each addon that must approve a chat completion records its name with
:func:`passed`; the last addon (``Seal``) forwards only flows that every
required stage approved. An addon that raised, or was skipped, leaves its
stage missing, and the flow is refused.
"""

from __future__ import annotations

from mitmproxy import http

STAGES = "teegate.stages"


def passed(flow: http.HTTPFlow, stage: str) -> None:
    flow.metadata.setdefault(STAGES, set()).add(stage)


def has_passed(flow: http.HTTPFlow, stage: str) -> bool:
    return stage in flow.metadata.get(STAGES, ())


def is_chat(flow: http.HTTPFlow) -> bool:
    """A chat completion still on its way (not yet answered locally)."""
    return flow.response is None and flow.metadata.get("teegate.route") == "chat"
