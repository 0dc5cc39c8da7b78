"""Prometheus metrics of the request path, and the recent refusals the admin API lists.

:class:`Meter` owns the metric objects, on a registry of its own (so tests and several
gateways in one process never share counters); the admin listener (:mod:`teegate.admin`)
exposes it. :class:`RequestMetrics` is the addon that counts every finished flow; Billing
reports charges and ledger commit times to the same :class:`Meter`, Egress its decisions.

What a label may carry: fixed words the gateway chose (route, decision, error code, HTTP
status, egress host class) and model ids **only when the catalog lists them** (anything
else a client sent as a model is its text: ``other``). Never a key, an account, a host a
client named, or a path it made up (unknown paths are the route ``other``).

Several processes (``--workers``): prometheus_client's multiprocess mode keeps counters and
histograms in files under ``PROMETHEUS_MULTIPROC_DIR`` whatever registry they were made on,
and the scrape then reads all processes' files (:func:`teegate.admin.metrics.exposition`).
Nothing here needs to change for it: this module has no gauges of its own (the state gauges
are computed at scrape time by the admin collector) and labels are the same in every process.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from mitmproxy import connection, http
from prometheus_client import CollectorRegistry, Counter, Histogram

from teegate.addons import flowstate
from teegate.addons.accesslog import HEAD_TOO_LARGE, decision
from teegate.addons.account import ACCOUNT_PATH
from teegate.addons.attestation_report import REPORT_PATH
from teegate.addons.flowstate import Route
from teegate.addons.response_guard import guarded_response
from teegate.addons.routes import CHAT_PATH, RESPONSES_PATH

log = structlog.get_logger("teegate.metrics")

OTHER = "other"
NONE = "none"
MAX_LABEL = 200

# Seconds: a fast local refusal to a long reasoning answer's first token.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RECEIPT_OUTCOMES = frozenset({"complete", "incomplete", "withdrawn", "lost"})
RECEIPT_REASONS = frozenset({
    "upstream_aborted", "client_disconnected", "gateway_error", "model_mismatch",
    "e2ee_failed", "upstream_error", "unreadable", "deadline", "issue_failed", "issuer_fault",
})
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


def model_label(model: str | None, known: Container[str]) -> str:
    """A model id as a label value: itself only when the catalog lists it, else ``other``.

    ``none`` for a request that named no model (or was refused before one was read).
    """
    if model is None:
        return NONE
    if model in known and len(model) <= MAX_LABEL and model.isprintable():
        return model
    return OTHER


def route_label(flow: http.HTTPFlow) -> str:
    """The endpoint a flow was for, from a fixed list; anything else is ``other``."""
    if flowstate.route(flow) == Route.PASSTHROUGH:
        return "passthrough"
    if flowstate.responses_call(flow) is not None:  # its path was rewritten to the chat path
        return RESPONSES_PATH
    path = flow.request.path.split("?", 1)[0]
    if path in (CHAT_PATH, "/v1/models", REPORT_PATH, ACCOUNT_PATH):
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return OTHER


class Meter:
    """Every metric the gateway exports, on one registry."""

    def __init__(
        self,
        known_models: Callable[[], Container[str]] = frozenset,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.known_models = known_models
        """The catalog's ids: the only model names a label may carry (set once wired)."""
        r = self.registry
        self.requests = Counter(
            "teegate_requests",
            "Requests by route, model, HTTP status, decision and error code.",
            ("route", "model", "status", "decision", "code"),
            registry=r,
        )
        self.upstream_latency = Histogram(
            "teegate_upstream_latency_seconds",
            "Forwarded chat completions: request sent to response headers received.",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "teegate_time_to_first_token_seconds",
            "Streamed chat completions: request sent to the first stream bytes.",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "teegate_tokens",
            "Tokens charged, by model and direction (in: prompt, out: completion).",
            ("model", "direction"),
            registry=r,
        )
        self.charged = Counter(
            "teegate_charged_micro_usd",
            "Micro-USD charged for settled usage, by model: what was taken from the balance "
            "(usage priced above the reservation is taken only up to the account's balance; "
            "the rest is recorded as unrecovered, not counted here).",
            ("model",),
            registry=r,
        )
        self.ledger_commit = Histogram(
            "teegate_ledger_commit_seconds",
            "Time a chat request waited for its reservation to be committed (group commit).",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.ratelimited = Counter(
            "teegate_ratelimit_refusals",
            "Requests refused with 429 rate_limit_exceeded.",
            registry=r,
        )
        self.signatures = Counter(
            "teegate_response_signatures",
            "Upstream response signatures checked, by model and outcome (verified, missing, "
            "failed, unchecked).",
            ("model", "status"),
            registry=r,
        )
        self.egress = Counter(
            "teegate_egress_decisions",
            "Egress listener decisions by host class (the policy's verdict) and unit "
            "(an HTTP request judged, or a TLS/TCP connection tunnelled unread).",
            ("host_class", "unit"),
            registry=r,
        )
        self.receipts = Counter(
            "teegate_receipts",
            "Receipts promised to a client (an x-teegate-receipt id sent) by how the promise "
            "ended: complete, incomplete (reason: why the stream was cut), withdrawn (the "
            "answer was withheld before its headers left: the id never reached the client) "
            "or lost (the issuer failed: the id answers 404).",
            ("outcome", "reason"),
            registry=r,
        )

    def model(self, model: str | None) -> str:
        try:
            known = self.known_models()
        except Exception:
            known = frozenset()
        return model_label(model, known)

    # -- what the addons report --------------------------------------------------------

    def charge(self, model: str, prompt: int, completion: int, micro: int) -> None:
        label = self.model(model)
        self.tokens.labels(label, "in").inc(prompt)
        self.tokens.labels(label, "out").inc(completion)
        self.charged.labels(label).inc(micro)

    def commit_wait(self, seconds: float) -> None:
        self.ledger_commit.observe(seconds)

    def signature(self, model: str, status: str) -> None:
        self.signatures.labels(self.model(model), status).inc()

    def egress_decision(self, host_class: str, unit: str) -> None:
        self.egress.labels(host_class, unit).inc()

    def receipt(self, outcome: str, reason: str = "") -> None:
        """One promise ended; ``outcome``/``reason`` outside the fixed sets count as ``other``
        (a label never carries a word the gateway did not choose)."""
        if outcome not in RECEIPT_OUTCOMES:
            outcome = OTHER
        if reason and reason not in RECEIPT_REASONS:
            reason = OTHER
        self.receipts.labels(outcome, reason).inc()


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused request, metadata only: no key, no account, no client text."""

    at: float  # Unix seconds
    code: str
    status: int | None
    route: str
    model: str  # a catalog id, ``other`` or ``none``

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))
        }


class RecentRefusals:
    """The last ``size`` refusals, newest last (a bounded ring buffer)."""

    def __init__(self, size: int = 200) -> None:
        self._items: deque[Refusal] = deque(maxlen=size)

    def add(self, refusal: Refusal) -> None:
        self._items.append(refusal)

    def newest_first(self, limit: int | None = None) -> list[Refusal]:
        items = list(reversed(self._items))
        return items if limit is None else items[:limit]


class RequestMetrics:
    """Counts every finished flow (response or error) once, and keeps its refusal if any."""

    def __init__(self, meter: Meter, refusals: RecentRefusals) -> None:
        self._meter = meter
        self._refusals = refusals

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    @guarded_response
    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def request_head_too_large(self, client: connection.Client) -> None:
        """A head refused with 431 before any flow existed (teegate/master.py)."""
        self._meter.requests.labels(OTHER, NONE, "431", "refused", HEAD_TOO_LARGE).inc()
        self._refusals.add(
            Refusal(at=time.time(), code=HEAD_TOO_LARGE, status=431, route=OTHER, model=NONE)
        )

    def _record(self, flow: http.HTTPFlow) -> None:
        if flowstate.counted(flow):
            return
        flowstate.set_counted(flow)
        try:
            self._count(flow)
        except Exception as e:  # metrics must never disturb a request
            log.error("metrics_failed", error=type(e).__name__)

    def _count(self, flow: http.HTTPFlow) -> None:
        m = self._meter
        route = route_label(flow)
        model = NONE
        if flowstate.has_chat_request(flow):  # a model the catalog does not list: "other"
            model = m.model(flowstate.listed_model(flow) or "")
        resp = flow.response
        sent = flowstate.sent_status(flow)
        status = str(sent) if sent is not None else NONE
        code = flowstate.error_code(flow) or ""
        m.requests.labels(route, model, status, decision(flow) or NONE, code).inc()
        if code:
            if code == "rate_limit_exceeded":
                m.ratelimited.inc()
            self._refusals.add(
                Refusal(
                    at=time.time(),
                    code=code,
                    status=sent,
                    route=route,
                    model=model,
                )
            )
            return
        req = flow.request
        if route != CHAT_PATH or resp is None or not req.timestamp_end:
            return
        if flow.server_conn.timestamp_start and resp.timestamp_start:
            m.upstream_latency.labels(model).observe(
                max(resp.timestamp_start - req.timestamp_end, 0.0)
            )
        tally = flowstate.stream_tally(flow)
        if tally is not None and tally.first_byte_at is not None:
            m.ttft.labels(model).observe(max(tally.first_byte_at - req.timestamp_end, 0.0))
