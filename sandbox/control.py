"""``/_sandbox/*``: test-only switches and counters (no API key: they are not part of the API)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from teegate.sandbox.errors import error_response
from teegate.sandbox.state import SandboxState


def _json(payload: Any) -> web.Response:
    return web.Response(body=json.dumps(payload).encode(), content_type="application/json")


async def get_behaviour(request: web.Request) -> web.Response:
    return _json(request.app["state"].behaviour.model_dump())


async def set_behaviour(request: web.Request) -> web.Response:
    state: SandboxState = request.app["state"]
    try:
        patch = json.loads(await request.read())
    except ValueError:
        return error_response(400, "behaviour must be a JSON object")
    if not isinstance(patch, dict):
        return error_response(400, "behaviour must be a JSON object")
    try:
        state.set_behaviour(state.behaviour.merged(patch))
    except ValidationError as e:
        return error_response(400, f"invalid behaviour: {e}")
    return _json(state.behaviour.model_dump())


async def reset(request: web.Request) -> web.Response:
    state: SandboxState = request.app["state"]
    state.reset()
    return _json({"ok": True})


async def stats(request: web.Request) -> web.Response:
    """``?since=N``: only the requests recorded after the N-th (the rest is cheap to poll)."""
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        return error_response(400, "since must be an integer")
    return _json(request.app["state"].stats(since))


async def release(request: web.Request) -> web.Response:
    request.app["state"].release()
    return _json({"released": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/_sandbox/release", release)
    app.router.add_get("/_sandbox/behaviour", get_behaviour)
    app.router.add_post("/_sandbox/behaviour", set_behaviour)
    app.router.add_post("/_sandbox/reset", reset)
    app.router.add_get("/_sandbox/stats", stats)
