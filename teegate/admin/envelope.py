"""Errors in the API's OpenAI envelope, and the admin bearer-token check.

Every answer that is not a success is ``{"error": {...}}`` as on the ``/v1`` API
(:class:`teegate.addons.errors.GatewayError`), including aiohttp's own 404 and 405 and any
exception a handler raises (a 500 whose log line names the exception type, never its text).
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from teegate.addons.errors import GatewayError
from teegate.ledger import (
    IdempotencyConflict,
    InvalidInput,
    LedgerError,
    UnknownAccount,
    UnknownKey,
)
from teegate.ledger.admintokens import AdminTokens
from teegate.money import InvalidAmount

log = structlog.get_logger("teegate.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMIN_PREFIX = "/admin/"


def error_response(err: GatewayError) -> web.Response:
    headers = {"cache-control": "no-store", **err.headers}
    return web.json_response(err.body(), status=err.status, headers=headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, code, param=param)


def _from_ledger(e: LedgerError) -> GatewayError:
    if isinstance(e, UnknownAccount):
        return GatewayError(404, str(e), "account_not_found")
    if isinstance(e, UnknownKey):
        return GatewayError(404, str(e), "key_not_found")
    if isinstance(e, IdempotencyConflict):
        return GatewayError(409, str(e), "idempotency_key_reused")
    if isinstance(e, InvalidInput):
        return invalid(str(e))
    return GatewayError(503, "The ledger is unavailable; retry shortly.", "ledger_unavailable")


def _from_http(request: web.Request, e: web.HTTPException) -> GatewayError:
    method, path = request.method[:16], request.path[:256]
    if e.status == 404:
        return GatewayError(404, f"Unknown admin endpoint: {method} {path}.", "not_found")
    if e.status == 405:
        allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
        return GatewayError(
            405,
            f"Method {method} is not allowed on {path}" + (f"; use {allowed}." if allowed else "."),
            "method_not_allowed",
            headers={"allow": allowed} if allowed else None,
        )
    return GatewayError(e.status, e.reason or "request refused", "invalid_request")


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as e:
        return error_response(e)
    except InvalidAmount as e:
        return error_response(invalid(str(e), "amount_usd"))
    except LedgerError as e:
        return error_response(_from_ledger(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(_from_http(request, e))
    except Exception as e:
        frames = traceback.extract_tb(e.__traceback__)
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
        log.error("admin_failed", route=_route(request), error=type(e).__name__, at=where)
        return error_response(
            GatewayError(500, "The admin listener hit an internal error.", "internal_error")
        )


def _route(request: web.Request) -> str:
    """The matched route's pattern (never the path a client typed, which may be anything)."""
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def require_token(
    tokens: Callable[[], AdminTokens],
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: every ``/admin/`` path needs an active admin token (``401`` otherwise)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(ADMIN_PREFIX):
            token = bearer(request)
            if not token:
                raise unauthorized(
                    "No admin token. Send 'Authorization: Bearer <token>' "
                    "(create one with: teegate admin token create)."
                )
            if await tokens().authenticate(token) is None:
                raise unauthorized("Incorrect admin token, or the token was revoked.")
        return await handler(request)

    return check


def unauthorized(message: str) -> GatewayError:
    return GatewayError(
        401,
        message,
        "invalid_admin_token",
        headers={"www-authenticate": 'Bearer realm="teegate-admin"'},
    )
