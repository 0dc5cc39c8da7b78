"""A Chutes upstream on the request path: seal each chat to one verified instance, open its answer.

Why: Chutes' API front door routes a request to one of a chute's instances. With E2EE the body
is encrypted (ML-KEM-768, HKDF-SHA256, ChaCha20-Poly1305; :mod:`teegate.catalog.chutes.e2ee`)
to the key that instance's TDX quote binds, which the gateway verified itself
(:mod:`teegate.catalog.attestation.chutes`), so only that enclave reads the prompt and only
the gateway reads the answer. The front door sees the headers below, the path and the stream
flag; never the body.

What this module adds to the path, in hook order:

* :func:`seal` (called by :class:`~teegate.addons.upstream.UpstreamRewrite`): the validated,
  re-serialized body, sealed to the ticket's key, as ``POST /e2e/invoke`` with headers built
  here (never the client's): ``Authorization``, ``X-Chute-Id``, ``X-Instance-Id``,
  ``X-E2E-Nonce``, ``X-E2E-Stream``, ``X-E2E-Path``.
* :class:`E2EEOpen` (first in the chain, so its ``response`` hook runs before the model check,
  the access log and billing read the answer): a non-streamed answer is opened and its body
  replaced by the plaintext JSON. An answer that does not open is never relayed: ``502
  e2ee_failed`` (released, like any answer the client did not get); an error the model sealed
  is ``502 upstream_error``. A front-door refusal that comes before any instance reads the body
  (403 token refused, 404 instance gone, 400 stale key) reports the ticket failed with
  ``sent=False`` so the pool moves on, and the client gets ``503 e2ee_instance_unavailable``
  to retry; other plaintext errors (429, an instance's 5xx) are relayed as today. The request
  is not retried here: mitmproxy sends one request per flow, and re-sending from a response
  hook would bypass the relay, the deadline and the stream path; an honest 503 that the next
  attempt (on another verified instance) answers is the simpler guarantee.
* Streams: :class:`~teegate.addons.streaming.StreamRelay` runs every SSE event through the
  flow's :class:`StreamOpener` before its usual handling (usage then comes from inside the
  encrypted payload, never from the relay's plaintext ``usage`` events); a frame that does not
  open ends the stream with an error event and is billed by the existing rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, refuse
from teegate.addons.flowstate import Route
from teegate.addons.headers import add_headers
from teegate.addons.response_guard import guarded_response
from teegate.catalog.chutes.e2ee import E2EEError, StreamOpener, open_response, seal_request

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

    from teegate.catalog.chutes.pool import FailureKind, InstancePool, Ticket

log = structlog.get_logger("teegate")

INVOKE_PATH = "/e2e/invoke"
E2EE_HEADER = "x-teegate-e2ee"
INSTANCE_HEADER = "x-teegate-instance-id"
FAILED = "e2ee_failed"
UNAVAILABLE = "e2ee_instance_unavailable"
NO_INSTANCE = "no_attested_instance"


@dataclass
class E2EEFlow:
    """What one sealed chat needs to open its answer and report its instance."""

    pool: InstancePool
    ticket: Ticket
    response_key: MLKEM768PrivateKey
    stream: bool
    reported: bool = False

    def failed(self, *, sent: bool, kind: FailureKind = "instance") -> None:
        """Tell the pool once that this ticket failed (``token``: only its nonce token was
        refused; ``instance``: withdraw the instance until it is verified again)."""
        if not self.reported:
            self.reported = True
            self.pool.failed(self.ticket, sent=sent, kind=kind)

    def opener(self) -> StreamOpener:
        return StreamOpener(self.response_key)


def no_attested_instance(
    model: str, why: str | None = None, code: str = NO_INSTANCE
) -> GatewayError:
    """503: no verified instance can take the request (``attested_instance_busy``: verified
    instances exist but every nonce token is in use); nothing was sent."""
    detail = f" ({why})" if why else ""
    busy = code != NO_INSTANCE
    what = "has an unused nonce token" if busy else "passed hardware attestation"
    return GatewayError(
        503,
        f"No instance of model '{model}' {what}{detail}; nothing was sent. Retry shortly.",
        code,
        type="api_error",
    )


def e2ee_failed() -> GatewayError:
    return GatewayError(
        502,
        "The upstream's end-to-end encrypted answer did not decrypt under this request's key; "
        "nothing of it was relayed.",
        FAILED,
        type="api_error",
    )


def instance_unavailable(status: int) -> GatewayError:
    return GatewayError(
        503,
        f"The attested instance chosen for this request refused it (HTTP {status}) before "
        "reading it; nothing was sent to the model. Retry: the next attempt uses another "
        "verified instance.",
        UNAVAILABLE,
        type="api_error",
    )


def seal(
    flow: http.HTTPFlow,
    body: bytes,
    *,
    pool: InstancePool,
    ticket: Ticket,
    chute_id: str,
    authorization: str,
    host_header: str,
    stream: bool,
) -> None:
    """Make the flow's request the sealed ``POST /e2e/invoke`` (origin pinned by the caller)."""
    sealed = seal_request(json.loads(body), ticket.e2e_pubkey)
    flowstate.set_e2ee(
        flow, E2EEFlow(pool=pool, ticket=ticket, response_key=sealed.response_key, stream=stream)
    )
    flow.request.path = INVOKE_PATH
    flow.request.headers = http.Headers(
        host=host_header,
        content_type="application/octet-stream",
        accept="text/event-stream" if stream else "application/octet-stream",
        accept_encoding="identity",
        authorization=authorization,
        user_agent="teegate",
        x_request_id=flowstate.request_id(flow) or "",
    )
    h = flow.request.headers
    h["X-Chute-Id"] = chute_id
    h["X-Instance-Id"] = ticket.instance_id
    h["X-E2E-Nonce"] = ticket.nonce
    h["X-E2E-Stream"] = "true" if stream else "false"
    h["X-E2E-Path"] = "/v1/chat/completions"
    flow.request.content = sealed.payload
    add_headers(flow, instance_headers(pool, ticket.instance_id))


def instance_headers(pool: InstancePool, instance_id: str) -> dict[str, str]:
    """The exact instance a sealed chat went to, and the verdict it was sent under: its own
    quote's hash and verification time replace the model-level ones."""
    headers = {E2EE_HEADER: "true", INSTANCE_HEADER: instance_id}
    verdicts = getattr(pool, "instance_verdicts", None)
    for v in verdicts() if callable(verdicts) else ():
        if v.instance_id == instance_id and v.ok:
            headers["x-teegate-attested-at"] = str(v.verified_at)
            if v.quote_sha256:
                headers["x-teegate-quote-sha256"] = v.quote_sha256
    return headers


class E2EEOpen:
    """Opens non-streamed E2EE answers; reports failed instances. First in the chain."""

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        state = flowstate.e2ee(flow)
        resp = flow.response
        if state is None or resp is None or flowstate.route(flow) != Route.CHAT:
            return
        if flowstate.stream_tally(flow) is not None:
            return  # a stream: the relay opened it event by event
        try:
            self._open(flow, state, resp)
        except Exception as e:  # never relay what we could not open
            log.error("e2ee_open_fault", error=type(e).__name__)
            refuse(flow, e2ee_failed())

    @guarded_response
    def error(self, flow: http.HTTPFlow) -> None:
        """No answer from the instance (unreachable, reset, timed out): withdraw it until it is
        verified again. A client that left, or a stream already answered, says nothing about
        the instance."""
        state = flowstate.e2ee(flow)
        if state is None or flow.response is not None:
            return
        if flow.error is not None and flow.error.msg == "Client disconnected.":
            return
        conn = flow.server_conn
        state.failed(sent=conn is not None and conn.timestamp_tcp_setup is not None)

    def _open(self, flow: http.HTTPFlow, state: E2EEFlow, resp: http.Response) -> None:
        ctype = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if resp.status_code >= 400 and ctype != "application/octet-stream":
            self._refused(flow, state, resp.status_code)
            return
        try:
            plain = open_response(resp.content or b"", state.response_key)
            doc = json.loads(plain)
        except (E2EEError, ValueError):
            state.failed(sent=True)
            log.error("e2ee_open_failed", request_id=flowstate.request_id(flow))
            refuse(flow, e2ee_failed())
            return
        if isinstance(doc, dict) and "error" in doc and "choices" not in doc:
            # The model failed inside the enclave and said so under our key.
            refuse(flow, upstream_error())
            return
        if "content-encoding" in resp.headers:
            del resp.headers["content-encoding"]
        resp.headers["content-type"] = "application/json"
        resp.content = plain

    def _refused(self, flow: http.HTTPFlow, state: E2EEFlow, status: int) -> None:
        """A plaintext error from the front door (or an instance error it relayed)."""
        kind = REFUSED_BEFORE_READING.get(status)
        if kind is None:
            return  # the upstream's own answer (rate limit, instance error): relayed as today
        state.failed(sent=False, kind=kind)
        log.warning("e2ee_instance_refused", request_id=flowstate.request_id(flow), status=status)
        refuse(flow, instance_unavailable(status))


# Front-door refusals that come before any instance reads the body (Chutes' e2e router):
# 403 the nonce token (used, expired, not this instance's), 404 the instance is gone,
# 400 the blob does not open under the key the instance serves now (it restarted with a
# new one) or the instance is not of this chute.
REFUSED_BEFORE_READING: dict[int, FailureKind] = {403: "token", 404: "instance", 400: "instance"}


def upstream_error() -> GatewayError:
    return GatewayError(
        502,
        "The model failed inside the attested instance (its error arrived end-to-end "
        "encrypted); nothing else was relayed.",
        "upstream_error",
        type="api_error",
    )


def describe_instances(instances: list[Any]) -> list[dict[str, Any]]:
    """The verified instances as ``/v1/models`` and the report show them."""
    out = []
    for inst in instances:
        dump = getattr(inst, "model_dump", None)
        out.append(dump(mode="json") if callable(dump) else dict(inst))
    return out
