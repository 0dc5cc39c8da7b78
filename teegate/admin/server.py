"""Starting and stopping the admin listener, and the routes it serves.

Why an aiohttp server on the gateway's event loop, started by :func:`teegate.runner.serve`
before the proxy and stopped after it, rather than a mitmproxy listener or an addon's
``running`` hook: admin requests then never enter the addon chain (no addon has to recognise
and skip them, and no bug in one can forward an admin request, or its token, upstream); a
port that cannot be bound stops the start with a message and exit code 2 like a locked
ledger, instead of an error logged from inside a hook; and it shares the process's objects
(ledger, catalog, verdicts, counters) without any copying.

Who may reach it: on a loopback address (the default) anyone on the machine may read
``/metrics`` and the health checks, and the admin API needs a token; on any other address the
gateway refuses to start until a token exists (:func:`check_exposure`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from teegate.addons.attestation import AttestationSync
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.metrics import Meter, RecentRefusals
from teegate.admin.api import AdminApi
from teegate.admin.envelope import envelope, require_token
from teegate.admin.health import Readiness, healthz
from teegate.admin.metrics import CONTENT_TYPE, StateCollector, exposition
from teegate.config import AdminSettings
from teegate.dashboard.app import MOUNT, Dashboard
from teegate.ledger import Ledger


class AdminStartError(Exception):
    """The admin listener cannot start: it would be reachable from the network with no
    admin token, or its address cannot be bound."""


@dataclass
class Observed:
    """What the admin listener reads from the request path: counters, refusals, and the
    catalog and attestation objects (set by :func:`teegate.runner.build_addons`)."""

    meter: Meter
    refusals: RecentRefusals
    catalog: CatalogSync | None = None
    attestation: AttestationSync | None = None
    extra_routes: list[web.RouteDef] = field(default_factory=list)


async def check_exposure(settings: AdminSettings, ledger: Ledger) -> None:
    """Refuse an admin listener off loopback while no admin token exists."""
    if settings.active and not settings.loopback and not await ledger.admin_tokens.any_active():
        raise AdminStartError(
            f"admin.listen = {settings.listen!r} is reachable from the network, and no admin "
            f"token exists: create one first (teegate admin token create --db {ledger.path}), or "
            'listen on loopback, or set admin.enabled = false'
        )


def build_app(
    observed: Observed, link: LedgerLink, settings: AdminSettings | None = None
) -> web.Application:
    catalog, attestation = observed.catalog, observed.attestation
    assert catalog is not None and attestation is not None, "build_addons fills these in"
    state = StateCollector(catalog, attestation, link)

    async def metrics(_request: web.Request) -> web.Response:
        body = exposition(observed.meter, state)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE})

    app = web.Application(
        middlewares=[envelope, require_token(lambda: link.get().admin_tokens)],
        client_max_size=64 * 1024,
    )
    api = AdminApi(link, catalog, attestation, observed.refusals)
    app.add_routes(
        [
            web.get("/metrics", metrics),
            web.get("/healthz", healthz),
            web.get("/readyz", Readiness(catalog, attestation, link).readyz),
            *api.routes(),
            *observed.extra_routes,
        ]
    )
    if settings is not None and settings.dashboard:
        dashboard = Dashboard(settings, link, api, catalog, attestation)
        app.router.add_get(MOUNT, _to_dashboard)
        app.add_subapp(MOUNT, dashboard.app())
    return app


async def _to_dashboard(_request: web.Request) -> web.Response:
    return web.Response(status=308, headers={"location": f"{MOUNT}/"})


class AdminServer:
    def __init__(self, settings: AdminSettings, observed: Observed, link: LedgerLink) -> None:
        self._settings = settings
        self._observed = observed
        self._link = link
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    async def start(self) -> None:
        """Bind and serve (OSError when the address cannot be bound)."""
        host, _, port = self._settings.listen.rpartition(":")
        host = host.strip("[]")
        app = build_app(self._observed, self._link, self._settings)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, int(port))
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise AdminStartError(
                f"admin listener {self._settings.listen}: {e.strerror or e}"
            ) from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
