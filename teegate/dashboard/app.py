"""The dashboard's routes, mounted at ``/dashboard/`` on the admin listener.

What the browser gets: static files (HTML, vanilla JS modules, CSS and one vendored chart
library, :data:`STATIC`), a sign-in form, and JSON under ``/dashboard/api/``. That JSON is
the admin API's own handlers (:class:`teegate.admin.api.AdminApi`, the same functions at a
second path), so a top-up or a revocation from the page is the very operation the admin API
and the command line perform; only the credential differs: a session cookie instead of a
bearer token.

Why another path rather than letting ``/admin/v1`` accept the cookie: the cookie is scoped
to ``Path=/dashboard``, so the browser never sends it anywhere else (not to the admin API, and
not to the gateway's API listener on the same host, whose port a cookie does not tell
apart); and the bearer API keeps exactly one way in, with no CSRF exposure at all.

The rules (:func:`guard`):

- every ``/dashboard/api/`` request needs a live session, re-checked against the ledger
  (a revoked admin token or API key ends its sessions at once);
- every state change (any method but GET/HEAD) needs the session's CSRF token in an
  ``X-CSRF-Token`` header (a cross-site form cannot set a header, a cross-site script cannot
  read the token), and is refused when ``Origin`` or ``Sec-Fetch-Site`` says another site
  sent it; sign-in (no session yet, so no CSRF token) gets that origin check, and always a
  fresh session id, never one the browser already had;
- a key holder's session reaches only ``session``, ``me`` and ``logout``;
- nothing secret is ever in a URL: tokens come in a POST body, the session in a cookie, and
  a new API key only in the body of the response that created it.
"""

from __future__ import annotations

import html
from pathlib import Path

import structlog
from aiohttp import web

from teegate.addons.attestation import AttestationSync
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.errors import GatewayError
from teegate.addons.ledgerlink import LedgerLink
from teegate.admin.api import PREFIX as ADMIN_PREFIX
from teegate.admin.api import AdminApi, ok
from teegate.config import AdminSettings
from teegate.dashboard.sessions import Session, Sessions
from teegate.dashboard.views import attestation_details, keyholder_account
from teegate.ledger.admintokens import PREFIX as ADMIN_TOKEN_PREFIX

log = structlog.get_logger("teegate.dashboard")

MOUNT = "/dashboard"
STATIC = Path(__file__).with_name("static")
COOKIE = "teegate_dashboard"
SAFE_METHODS = frozenset({"GET", "HEAD"})
KEYHOLDER_PATHS = frozenset({"/api/session", "/api/me", "/api/logout"})
SESSION_KEY = web.AppKey("session", Session)

# No inline script or style anywhere, no framing, no referrer leaving the site.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
}


class Dashboard:
    def __init__(
        self,
        settings: AdminSettings,
        link: LedgerLink,
        api: AdminApi,
        catalog: CatalogSync,
        attestation: AttestationSync,
    ) -> None:
        self._link = link
        self._secure_cookie = settings.secure_cookie
        self._api = api
        self._catalog = catalog
        self._attestation = attestation
        self.sessions = Sessions(settings.session_idle_s)
        self._login_page = (STATIC / "login.html").read_text(encoding="utf-8")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard])
        app.on_response_prepare.append(_security_headers)
        app.add_routes(
            [
                web.get("/", self.index),
                web.post("/login", self.login),
                web.get("/api/session", self.session),
                web.post("/api/logout", self.logout),
                web.get("/api/me", self.me),
                web.get("/api/attestation/details", self.attestation),
                *self._admin_routes(),
            ]
        )
        app.router.add_static("/static", STATIC, show_index=False, follow_symlinks=False)
        return app

    def _admin_routes(self) -> list[web.RouteDef]:
        """The admin API's handlers again, under ``/dashboard/api`` (cookie instead of bearer)."""
        routes = []
        for r in self._api.routes():
            assert isinstance(r, web.RouteDef) and r.path.startswith(ADMIN_PREFIX)
            path = "/api" + r.path[len(ADMIN_PREFIX) :]
            routes.append(web.route(r.method, path, r.handler, **r.kwargs))
        return routes

    # -- the rules -----------------------------------------------------------------------

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        rel = request.path[len(MOUNT) :]
        if request.method not in SAFE_METHODS:
            _same_origin(request)
        if rel.startswith("/api/"):
            session = await self._live(request)
            if session is None:
                raise GatewayError(
                    401, "You are not signed in, or your session ended: sign in again.",
                    "not_signed_in",
                )
            if request.method not in SAFE_METHODS and not session.csrf_ok(
                request.headers.get("x-csrf-token")
            ):
                raise GatewayError(
                    403,
                    "Missing or wrong CSRF token (X-CSRF-Token): reload the page and retry.",
                    "csrf_token_invalid",
                )
            if session.role != "admin" and rel not in KEYHOLDER_PATHS:
                raise GatewayError(
                    403, "This needs an operator (admin token) sign-in.", "admin_only"
                )
            request[SESSION_KEY] = session
        return await handler(request)

    async def _live(self, request: web.Request) -> Session | None:
        """The request's session, if it exists and its credential is still active."""
        session_id = request.cookies.get(COOKIE)
        session = self.sessions.get(session_id)
        if session is None:
            return None
        ledger = self._link.get()
        if session.role == "admin":
            alive = await ledger.admin_tokens.active(session.subject_id)
        else:
            found = await ledger.list_keys(key_id=session.subject_id)
            alive = bool(found) and found[0].revoked_ms is None
        if not alive:
            self.sessions.end(session_id)
            log.info("dashboard_session_ended", role=session.role, reason="credential_revoked")
            return None
        return session

    # -- pages ---------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        if await self._live(request) is None:
            return self._login(200)
        return web.FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    def _login(self, status: int, error: str = "") -> web.Response:
        shown = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        return web.Response(
            text=self._login_page.replace("<!--ERROR-->", shown),
            status=status,
            content_type="text/html",
            headers={"cache-control": "no-store"},
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = str(form.get("token", "")).strip()
        ledger = self._link.get()
        created: tuple[str, Session] | None = None
        if token.startswith(ADMIN_TOKEN_PREFIX):
            admin = await ledger.admin_tokens.authenticate(token)
            if admin is not None:
                created = self.sessions.create("admin", admin.token_id, None, admin.label)
        elif token:
            key = await ledger.authenticate(token)
            if key is not None:
                created = self.sessions.create("keyholder", key.key_id, key.account_id, key.label)
        if created is None:
            log.info("dashboard_signin_refused")
            return self._login(
                401, "That token was not accepted: it is unknown, mistyped or revoked."
            )
        self.sessions.end(request.cookies.get(COOKIE))  # never keep a pre-sign-in session
        session_id, session = created
        log.info("dashboard_signin", role=session.role, subject_id=session.subject_id)
        resp = web.Response(status=303, headers={"location": f"{MOUNT}/"})
        resp.set_cookie(
            COOKIE,
            session_id,
            path=MOUNT,
            httponly=True,
            samesite="Strict",
            secure=request.secure or self._secure_cookie,
        )
        return resp

    # -- JSON ----------------------------------------------------------------------------

    async def session(self, request: web.Request) -> web.Response:
        s = request[SESSION_KEY]
        return ok(
            {
                "object": "dashboard.session",
                "role": s.role,
                "label": s.label,
                "account_id": s.account_id,
                "csrf_token": s.csrf_token,
                "idle_timeout_s": int(self.sessions.idle_s),
            }
        )

    async def logout(self, request: web.Request) -> web.Response:
        s = request[SESSION_KEY]
        self.sessions.end(request.cookies.get(COOKIE))
        log.info("dashboard_signout", role=s.role, subject_id=s.subject_id)
        resp = ok({"object": "dashboard.signed_out"})
        resp.del_cookie(COOKIE, path=MOUNT)
        return resp

    async def me(self, request: web.Request) -> web.Response:
        s = request[SESSION_KEY]
        if s.role != "keyholder":
            raise GatewayError(
                404, "An operator session has no account of its own.", "no_account"
            )
        view = await keyholder_account(self._link.get(), s.subject_id)
        if view is None:
            raise GatewayError(401, "Your API key was revoked: sign in again.", "not_signed_in")
        return ok(view)

    async def attestation(self, _request: web.Request) -> web.Response:
        return ok(attestation_details(self._catalog, self._attestation))


def _same_origin(request: web.Request) -> None:
    """Refuse a state change another site's page sent (defence beside the CSRF token)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:  # the browser's own word, when it sends it
        allowed = site in ("same-origin", "none")
    else:
        origin = request.headers.get("origin")
        allowed = origin is None or origin == f"{request.scheme}://{request.host}"
    if not allowed:
        raise GatewayError(403, "Cross-site requests are refused.", "cross_site_request")


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
