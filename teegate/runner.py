"""Mount the addons on an embedded mitmproxy and run it."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import ctx, options

from teegate.addons.accesslog import AccessLog, RequestIds, listener_name
from teegate.addons.account import AccountEndpoint
from teegate.addons.attestation import AttestationSync
from teegate.addons.attestation_gate import AttestationGate, response_headers
from teegate.addons.attestation_report import AttestationReport
from teegate.addons.auth import Auth
from teegate.addons.billing import Billing
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.chutes import E2EEOpen
from teegate.addons.deadline import UpstreamDeadline
from teegate.addons.drain import Drain
from teegate.addons.egress import Egress
from teegate.addons.egress_auth import EgressAuth
from teegate.addons.error_pages import html_free_error_pages
from teegate.addons.flowstate import Stage
from teegate.addons.gate import Gate
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.limits import HeaderFields, ReleaseLargeBodies, Trailers
from teegate.addons.metrics import Meter, RecentRefusals, RequestMetrics
from teegate.addons.ratelimit import RateLimit
from teegate.addons.receipts import Receipts
from teegate.addons.responses import ResponsesIn, ResponsesOut
from teegate.addons.routes import Router
from teegate.addons.seal import Seal
from teegate.addons.streaming import StreamRelay
from teegate.addons.upstream import AnswerModelCheck, UpstreamErrorRetry, UpstreamRewrite
from teegate.addons.validate import ChatValidator
from teegate.addons.warmup import Warmup
from teegate.admin.server import AdminServer, AdminStartError, Observed, check_exposure
from teegate.catalog.attestation.receipts import ReceiptError, load_or_create_key
from teegate.config import Settings
from teegate.egress.ca import CAError, ensure_ca
from teegate.ledger import Ledger, LedgerError
from teegate.ledger.pgschema import redact
from teegate.listeners import serve_held, share_port
from teegate.master import GatewayMaster
from teegate.supervisor import die_with_parent

# Every stage must approve a chat completion before Seal lets it leave.
REQUIRED_STAGES = tuple(Stage)


def build_addons(
    settings: Settings,
    ledger: LedgerLink | None = None,
    ready: Ready | None = None,
    observed: Observed | None = None,
    open_listeners: Callable[[], Awaitable[None]] | None = None,
) -> list[Any]:
    """The request path, in hook order, each addon given the settings it reads.

    ``observed`` (the admin listener's view) gets the catalog and attestation objects and
    collects the metrics; without it the counters go to a meter nobody reads.
    ``open_listeners``: a worker's held listeners, opened once it has warmed up (Warmup).
    """
    up = settings.upstream
    catalog = CatalogSync(settings.catalog, up)
    link = ledger or LedgerLink()
    attestation = AttestationSync(settings.attestation, up, catalog)
    if observed is None:
        observed = new_observed(settings)
    observed.catalog, observed.attestation = catalog, attestation
    meter = observed.meter
    listed = ListedIds(catalog)
    meter.known_models = lambda: listed
    receipts = Receipts(settings.receipts, settings.signatures, up, attestation, link, meter=meter)
    return [
        E2EEOpen(),  # first: an encrypted answer is opened before anything reads it
        AnswerModelCheck(),  # its response hook must run before billing reads the answer
        RequestIds(),  # before anything may answer: every refusal carries its id
        Trailers(),  # before anything reads the request: its answer is a 400, whatever route
        catalog,
        attestation,  # after the catalog: subscribes to its refreshes in running()
        EgressAuth(link, settings.egress),  # egress listener only: before anything is decided
        Egress(
            settings.egress, up, reverse_listen=settings.listen.reverse, meter=meter
        ),  # egress only; before Router so its flows arrive like reverse
        HeaderFields(),  # after Egress: the client's own (passthrough) traffic is not judged
        Auth(link),
        RateLimit(settings.ratelimit, link),
        AttestationReport(catalog, attestation),  # after the key check, before Router's 404
        # Its endpoints before Router's 404; its receipt header before the header writer.
        receipts,
        ResponsesIn(settings.limits, settings.request),  # /v1/responses: into a chat completion
        AccountEndpoint(link),  # GET /v1/account: the key's own account, before Router's 404
        Router(catalog, attestation),
        ChatValidator(settings.defaults, settings.request, settings.limits),
        Gate(catalog),
        AttestationGate(attestation),  # a passing cached verdict, before anything is reserved
        Billing(link, unanswered=settings.billing.unanswered, meter=meter),
        UpstreamRewrite(up, attestation),
        StreamRelay(),
        ResponsesOut(),  # after billing and the relay read the chat answer: translates it back
        Seal(REQUIRED_STAGES),
        UpstreamDeadline(up),
        UpstreamErrorRetry(),  # an upstream's own 4xx/5xx: x-should-retry by its status
        response_headers(attestation),  # after every addon that adds a response header
        ReleaseLargeBodies(settings.limits),
        # Its running hook after those that start the catalog, attestation and receipts: a
        # worker listens once it can serve; then READY.
        Warmup(catalog, attestation, settings.workers.warmup_s, open_listeners),
        ready or Ready(),
        # After every hook that may still replace the answer (a fault fails it closed with a
        # 502; ResponsesOut translates it): they record what the client was actually sent.
        receipts.issuer,
        receipts.release_open,  # a promise the issuer left open (it raised): 404 at once
        RequestMetrics(meter, observed.refusals),
        AccessLog(),
        Drain(settings.workers.drain_s),  # last: a flow is done once every other hook ran
    ]


def new_observed(settings: Settings) -> Observed:
    return Observed(Meter(), RecentRefusals(settings.admin.recent_refusals))


class ListedIds:
    """Whether the current catalog lists a model id (confidential or not): a loggable label.

    A membership test on the live snapshot, so no set is built per request."""

    def __init__(self, catalog: CatalogSync) -> None:
        self._catalog = catalog

    def __contains__(self, model: object) -> bool:
        store = self._catalog.catalog
        snap = store.snapshot if store is not None else None
        return snap is not None and (model in snap.models or model in snap.non_confidential)


def option_values(settings: Settings) -> dict[str, Any]:
    """mitmproxy's own options; teegate's settings go to the addons' constructors."""
    up = settings.upstream
    modes = []
    if settings.listen.reverse:
        modes.append(f"reverse:{up.origin}@{settings.listen.reverse}")
    if settings.listen.egress:
        modes.append(f"regular@{settings.listen.egress}")
    values: dict[str, Any] = {
        "mode": modes,
        "connection_strategy": "lazy",
        "upstream_cert": False,  # name only the host asked for: the egress CA permits no more
        "termlog_verbosity": "warn",
        # Request bodies only (teegate/master.py), checked while buffering: 413 before a
        # larger body is held. Never stream_large_bodies: it would forward before the gate.
        "body_size_limit": str(settings.limits.max_body_bytes),
        "http3": False,  # and no UDP listener at all: teegate/master.py
        "keep_host_header": False,
        "http2": True,
        "confdir": str(settings.egress.confdir.expanduser()),
    }
    if up.ca_file:
        values["ssl_verify_upstream_trusted_ca"] = str(up.ca_file)
    return values


class Ready:
    """Prints the bound addresses once listening, so scripts and tests can connect."""

    def __init__(self, announce: Callable[[str], None] | None = None) -> None:
        self._announce = announce or (lambda line: print(line, flush=True))
        self.others: dict[str, str] = {}  # listeners not mitmproxy's: {"admin": url}

    def running(self) -> None:
        ps = ctx.master.addons.get("proxyserver")
        for server in ps.servers:
            for host, port, *_ in server.listen_addrs:
                kind = listener_name(server.mode.type_name)  # "egress", never "regular"
                self._announce(f"TEEGATE READY {kind} http://{_fmt_host(host)}:{port}")
        for kind, url in self.others.items():
            self._announce(f"TEEGATE READY {kind} {url}")
        self._announce("TEEGATE RUNNING")


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve(
    settings: Settings, ready: Ready | None = None, *, worker_id: int | None = None
) -> None:
    """Run one gateway process until it is told to stop.

    ``worker_id``: set for a worker of ``teegate run --workers N`` (teegate/supervisor.py),
    whose listeners share their ports with the other workers'. It is this machine's number
    (1..N) and names the process in logs only: a PostgreSQL ledger takes its lock id from the
    database's sequence, because several machines running ``--workers N`` on one database would
    otherwise claim the same ids (a dead worker's reservations are charged by any live worker's
    sweeper). Several processes may serve from one PostgreSQL ledger; an SQLite ledger refuses
    a second one (:class:`~teegate.ledger.LedgerLocked`).
    """
    settings.upstream.resolved_api_key()  # none: stop here, not at the first request
    html_free_error_pages()
    # Ours, before mitmproxy would make one named "mitmproxy"; permitting only what is intercepted.
    ensure_ca(settings.egress.confdir, intercepted_hosts(settings))
    load_or_create_key(settings.receipts.key_path)  # made (0600) or checked before listening
    # Opened before listening (a locked or too-new database stops the start; open
    # reservations of a crashed run are settled), closed after (queued charges commit).
    if worker_id is not None:
        die_with_parent()
        share_port(hold=True)
    ledger = await Ledger.open(
        settings.ledger.location,
        key_prefix=settings.ledger.key_prefix,
        synchronous=settings.ledger.synchronous,
        key_poll_ms=settings.ledger.key_poll_ms,
        sweep_interval_s=settings.ledger.sweep_interval_s,
        statement_timeout_ms=settings.ledger.statement_timeout_ms,
    )
    admin: AdminServer | None = None
    try:
        await check_exposure(settings.admin, ledger)
        ready = ready or Ready()
        link = LedgerLink(ledger)
        observed = new_observed(settings)
        master = GatewayMaster(options.Options())
        held = serve_held if worker_id is not None else None
        master.addons.add(*build_addons(settings, link, ready, observed, held))
        master.options.update(**option_values(settings))
        if settings.admin.active and worker_id in (None, 1):
            # Before the proxy listens, so READY names it; it reads the objects lazily. With
            # --workers, worker 1 alone serves it (dashboard sessions live in one process), and
            # /metrics adds up every worker's counters (PROMETHEUS_MULTIPROC_DIR, supervisor.py).
            admin = AdminServer(settings.admin, observed, link)
            await admin.start()
            assert admin.url is not None
            ready.others["admin"] = admin.url
        drain = master.addons.get("drain")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, drain.stop)
        await master.run()
    finally:
        if admin is not None:
            await admin.stop()
        await ledger.close()


def intercepted_hosts(settings: Settings) -> list[str]:
    """What the egress listener may intercept: the confidential upstream and the LLM hosts."""
    return [settings.upstream.origin_parts.host, *settings.egress.all_llm_hosts]


def run(settings: Settings, ready: Ready | None = None, *, worker_id: int | None = None) -> int:
    try:
        asyncio.run(serve(settings, ready, worker_id=worker_id))
    except KeyboardInterrupt:
        pass
    except LedgerError as e:
        print(f"teegate: ledger {redact(settings.ledger.location)}: {e}", file=sys.stderr)
        return 2
    except CAError as e:
        print(f"teegate: egress CA: {e}", file=sys.stderr)
        return 2
    except ReceiptError as e:
        print(f"teegate: receipts: {e}", file=sys.stderr)
        return 2
    except AdminStartError as e:
        print(f"teegate: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(Settings()))
