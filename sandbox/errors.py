"""OpenAI's error envelope, so clients (and the gateway) parse sandbox errors like real ones."""

from __future__ import annotations

import json

from aiohttp import web

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> web.Response:
    """``{"error": {"message", "type", "param", "code"}}`` with the given HTTP status."""
    kind = _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )
