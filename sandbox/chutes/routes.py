"""Routes of the Chutes flavour, and how it plugs into the sandbox app.

Why a single ``install`` function: ``sandbox/app.py`` adds the flavour with one call, and
everything the flavour needs (fleet, front-door record, stats, reset) is wired here.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from aiohttp import web

from teegate.sandbox.chutes.evidence import NONCE_RE, chute_evidence
from teegate.sandbox.chutes.fleet import Fleet, RateLimited, chute_id_for
from teegate.sandbox.chutes.frontdoor import FrontDoor
from teegate.sandbox.chutes.invoke import invoke
from teegate.sandbox.state import SandboxState


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json"
    )


def _detail(status: int, message: str) -> web.Response:
    return _json({"detail": message}, status)


def _authorized(request: web.Request) -> bool:
    expected = f"Bearer {request.app['options'].api_key}".encode()
    return hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected)


def with_chute_ids(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Catalog rows as Chutes lists them: each with its ``chute_id`` beside ``id``."""
    return {m: {**row, "chute_id": chute_id_for(m)} for m, row in rows.items()}


async def e2e_instances(request: web.Request) -> web.Response:
    state: SandboxState = request.app["state"]
    fleet: Fleet = request.app["chutes_fleet"]
    if not _authorized(request):
        return _detail(401, "Invalid or missing API key")
    chute_id = request.match_info["chute_id"]
    if not fleet.instances(chute_id):
        return _detail(404, "Chute not found")
    try:
        return _json(fleet.discover(chute_id, state.behaviour))
    except RateLimited:
        return _detail(429, "Rate limit exceeded for e2e_instances")


async def evidence(request: web.Request) -> web.Response:
    state: SandboxState = request.app["state"]
    fleet: Fleet = request.app["chutes_fleet"]
    chute_id = request.match_info["chute_id"]
    nonce = request.query.get("nonce", "")
    if not NONCE_RE.fullmatch(nonce):
        return _detail(400, "nonce must be 64 hex characters (32 bytes)")
    model = fleet.model_of.get(chute_id)
    if model is None:
        return _detail(404, "Chute not found")
    row = state.models.get(model)
    if row is None or row.get("confidential_compute") is not True:
        return _detail(400, f"Chute {chute_id} is not TEE-enabled")
    return _json(chute_evidence(fleet, request.app["evidence"], chute_id, nonce, state.behaviour))


async def published(request: web.Request) -> web.Response:
    fleet: Fleet = request.app["chutes_fleet"]
    door: FrontDoor = request.app["chutes_front_door"]
    return _json({**fleet.published(request.app["state"].behaviour), **door.stats()})


async def add_marker(request: web.Request) -> web.Response:
    """``{"marker": "..."}``: any relayed body containing it sets ``plaintext_seen``."""
    try:
        marker = json.loads(await request.read()).get("marker")
    except (ValueError, AttributeError):
        marker = None
    if not isinstance(marker, str) or not marker:
        return _detail(400, 'body must be {"marker": "<non-empty string>"}')
    request.app["chutes_front_door"].add_marker(marker)
    return _json({"markers": len(request.app["chutes_front_door"].markers)})


def install(app: web.Application, instances: int, discovery_per_minute: int) -> None:
    """Add the Chutes flavour to the sandbox app (call before the ``/v1`` catch-all)."""
    state: SandboxState = app["state"]
    fleet = Fleet(list(state.all_rows), instances, discovery_per_minute)
    door = FrontDoor()
    app["chutes_fleet"] = fleet
    app["chutes_front_door"] = door
    state.extra_stats.append(lambda: {**door.stats(), "chutes": fleet.published(state.behaviour)})
    state.on_reset.extend([fleet.reset, door.reset])
    app.router.add_get("/e2e/instances/{chute_id}", e2e_instances)
    app.router.add_post("/e2e/invoke", invoke)
    app.router.add_get("/chutes/{chute_id}/evidence", evidence)
    app.router.add_get("/_sandbox/chutes", published)
    app.router.add_post("/_sandbox/chutes/marker", add_marker)
