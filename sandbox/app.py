"""The sandbox's aiohttp application: catalog, chat, catch-all, control routes.

``register_routes`` is the single place where routes are added, so the attestation evidence
module can plug in with one line there.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from teegate.sandbox import control, evidence, signatures
from teegate.sandbox.behaviour import Behaviour
from teegate.sandbox.catalog_rows import load_rows
from teegate.sandbox.chat import ChatCompletions
from teegate.sandbox.errors import error_response
from teegate.sandbox.options import Options
from teegate.sandbox.state import SandboxState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONTROL_PREFIX = "/_sandbox/"
# Big enough for long-context prompts (aiohttp's default is 1 MiB).
MAX_BODY_BYTES = 64 * 1024 * 1024


def make_guard(api_key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Middleware: count and record every non-control request; demand the key on ``/v1/*``."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(CONTROL_PREFIX):
            return await handler(request)
        state: SandboxState = request.app["state"]
        state.count(f"{request.method} {path}")
        await state.requests.record(request)
        if path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "Invalid or missing API key", "invalid_api_key")
        return await handler(request)

    return guard


def _models_error(state: SandboxState) -> web.Response | None:
    status = state.behaviour.models_status
    if status is None:
        return None
    return error_response(status, "sandbox: forced models status", "sandbox_forced")


async def list_models(request: web.Request) -> web.Response:
    state: SandboxState = request.app["state"]
    return _models_error(state) or web.Response(
        body=state.models_body, content_type="application/json"
    )


async def get_model(request: web.Request) -> web.Response:
    state: SandboxState = request.app["state"]
    if (failure := _models_error(state)) is not None:
        return failure
    row = state.models.get(request.match_info["id"])
    if row is None:
        return error_response(404, "The model does not exist", "model_not_found", "model")
    return web.Response(body=json.dumps(row).encode(), content_type="application/json")


async def other_v1(request: web.Request) -> web.Response:
    """Any other API path answers 200, so a test can prove the gateway never forwarded it."""
    body = {"object": "sandbox.dummy", "method": request.method, "path": request.path}
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")


def register_routes(app: web.Application, options: Options) -> None:
    """Every route of the sandbox, in one place."""
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", ChatCompletions(options.chunks).handle)
    control.add_routes(app)
    # Attestation evidence (sandbox/evidence.py) registers here, before the catch-all.
    evidence.add_routes(app)
    signatures.add_routes(app)  # signs with the evidence's keys
    if options.upstream == "chutes":
        from teegate.sandbox.chutes.routes import install

        install(app, options.chutes_instances, options.chutes_discovery_per_minute)
    app.router.add_route("*", "/v1/{tail:.*}", other_v1)  # keep last


def make_app(options: Options) -> web.Application:
    """Build the application; its state lives in ``app["state"]`` (a SandboxState)."""
    baseline = Behaviour(delay_ms=options.delay_ms, chunk_delay_ms=options.chunk_delay_ms)
    app = web.Application(middlewares=[make_guard(options.api_key)], client_max_size=MAX_BODY_BYTES)
    rows = load_rows(options.models)
    if options.upstream == "chutes":
        from teegate.sandbox.chutes.routes import with_chute_ids

        rows = with_chute_ids(rows)
    app["state"] = SandboxState(rows, baseline)
    app["options"] = options
    register_routes(app, options)
    return app
