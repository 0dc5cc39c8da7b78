"""What goes upstream: the re-serialized request, with the upstream's key.

The request is rebuilt rather than edited: a fresh header set (so no client
``Authorization``, hop-by-hop or proxy header can leak through), the body
re-serialized from the validated object, and the destination pinned to the
configured upstream origin, method ``POST`` and path ``/v1/chat/completions``
whatever the flow arrived with (the router already refused anything else; this
holds even if it did not), with no request trailers.

:class:`AnswerModelCheck` holds the other end: a plain (non-streamed) answer is
relayed only if its ``model`` is the one that was requested, gated and attested;
otherwise the client gets ``502 upstream_model_mismatch`` and billing releases
the hold. Streamed answers are checked on their first chunk by the stream relay.

With a Chutes upstream and E2EE on (``upstream.kind = "chutes"``, ``upstream.e2ee``), the
rebuilt body is not sent as is: a ticket (a verified instance, the key its quote binds, one
nonce token) is taken from the model's instance pool and the body sealed to that key as
``POST /e2e/invoke`` (:mod:`teegate.addons.chutes`). No ticket: ``503 no_attested_instance``
and nothing leaves. Every chat response says whether it was end-to-end encrypted
(``x-teegate-e2ee``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from mitmproxy import ctx, exceptions, http

from teegate.addons import chutes, flowstate
from teegate.addons.errors import GatewayError, guarded, refuse, should_retry
from teegate.addons.flowstate import Stage
from teegate.addons.headers import add_headers
from teegate.addons.response_guard import guarded_response
from teegate.addons.routes import CHAT_PATH

if TYPE_CHECKING:
    from teegate.addons.attestation import AttestationSync
    from teegate.config import UpstreamSettings

log = structlog.get_logger("teegate")

MISMATCH = "upstream_model_mismatch"
SHOULD_RETRY = "x-should-retry"


class UpstreamRewrite:
    def __init__(
        self, upstream: UpstreamSettings, attestation: AttestationSync | None = None
    ) -> None:
        self._upstream = upstream
        self._attestation = attestation
        o = upstream.origin_parts
        self._origin = (o.scheme, o.host, o.port)
        self._host_header = o.host_header
        self._bearer: str | None = None

    @property
    def _sealed(self) -> bool:
        if self._attestation is not None:
            return self._attestation.sealed
        return self._upstream.kind == "chutes" and self._upstream.e2ee  # no pool: refused

    def _authorization(self) -> str:
        # Resolved on first use, not at construction: a chain is also built just to be
        # listed, without a key (``teegate.runner.serve`` checks there is one before it runs).
        if self._bearer is None:
            self._bearer = f"Bearer {self._upstream.resolved_api_key()}"
        return self._bearer

    def configure(self, updated: set[str]) -> None:
        if getattr(ctx.options, "stream_large_bodies", None):
            # Streamed request bodies go upstream before the request hook runs: no gate.
            raise exceptions.OptionsError(
                "stream_large_bodies would bypass the gate; leave it unset"
            )

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if not flowstate.is_chat(flow) or not flowstate.has_passed(flow, Stage.GATE):
            return
        add_headers(flow, {chutes.E2EE_HEADER: "false"})
        req = flowstate.chat_request(flow)
        opts = req.stream_options
        flowstate.set_client_wants_usage(flow, bool(req.stream and opts and opts.include_usage))
        body = req.upstream_body(include_usage=True)
        flowstate.set_upstream_model(flow, req.model)

        self._pin(flow)
        flow.request.headers = http.Headers(
            host=self._host_header,
            content_type="application/json",
            accept="text/event-stream" if req.stream else "application/json",
            accept_encoding="identity",
            authorization=self._authorization(),
            user_agent="teegate",
            x_request_id=flowstate.request_id(flow) or "",
        )
        flow.request.content = body
        if self._sealed and not await self._seal(flow, body, bool(req.stream)):
            return
        flowstate.passed(flow, Stage.UPSTREAM)

    async def _seal(self, flow: http.HTTPFlow, body: bytes, stream: bool) -> bool:
        """Seal the rebuilt request to a verified instance; False: refused, nothing leaves."""
        from teegate.catalog.chutes.pool import NoAttestedInstance

        model = flowstate.catalog_model(flow)
        pool = self._attestation.pool(model.id) if self._attestation is not None else None
        if pool is None or model.chute_id is None:
            refuse(flow, chutes.no_attested_instance(model.id, "no instance pool"))
            return False
        try:
            ticket = await pool.acquire()
        except NoAttestedInstance as e:
            refuse(flow, chutes.no_attested_instance(model.id, str(e) or None, e.code))
            return False
        chutes.seal(
            flow,
            body,
            pool=pool,
            ticket=ticket,
            chute_id=model.chute_id,
            authorization=self._authorization(),
            host_header=self._host_header,
            stream=stream,
        )
        return True

    def _pin(self, flow: http.HTTPFlow) -> None:
        """Send to the configured upstream, whatever address the flow arrived for."""
        r = flow.request
        r.scheme, r.host, r.port = self._origin
        r.method, r.path = "POST", CHAT_PATH
        r.trailers = None
        # Origin form, whatever form the client used: an absolute-form target
        # ("POST http://x/v1/...") keeps its authority, which HTTP/1 would send on as is
        # (the Host header built above names the upstream; HTTP/2 takes :authority from it).
        r.authority = ""
        if not (r.is_http2 or r.is_http3):
            r.http_version = "HTTP/1.1"  # an HTTP/1.0 client's request still leaves as 1.1


def model_mismatch() -> GatewayError:
    return GatewayError(
        502,
        "The upstream answered for a different model than the one requested and attested; "
        "nothing of its answer was relayed and nothing was charged.",
        MISMATCH,
        type="api_error",
    )


def log_mismatch(flow: http.HTTPFlow, answered: Any) -> None:
    flowstate.set_error_code(flow, MISMATCH)
    shown = answered[:200] if isinstance(answered, str) else type(answered).__name__
    log.error(
        MISMATCH,
        request_id=flowstate.request_id(flow),
        requested=flowstate.upstream_model(flow),
        answered=shown,
    )


class AnswerModelCheck:
    """Relay a plain answer only if it names the model that was requested.

    Placed first in the chain: its ``response`` hook must replace a mismatched answer
    before the access log and billing read the flow. Streams are left to the relay
    (their headers are already on the wire when the first chunk arrives).
    """

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or resp.status_code >= 400:
            return
        if not flowstate.has_passed(flow, Stage.UPSTREAM):
            return
        if flowstate.stream_tally(flow) is not None:  # a stream: the relay checked it
            return
        try:
            doc = resp.json()
            answered = doc.get("model") if isinstance(doc, dict) else doc
        except Exception:  # undecodable: cannot be shown to be the attested model's answer
            answered = None
        if isinstance(answered, str) and answered == flowstate.upstream_model(flow):
            return
        flow.response = model_mismatch().response()
        log_mismatch(flow, answered)


class UpstreamErrorRetry:
    """Say on an error the *upstream* answered whether sending it again can help.

    The gateway's own refusals carry ``x-should-retry`` (:data:`~teegate.addons.errors.
    RETRY_BY_CODE`); an upstream's 4xx/5xx is relayed as it came, so without this the client's
    SDK would fall back on its own rule. The rule is the gateway's, by status
    (:func:`~teegate.addons.errors.should_retry`): 400, 401, 402, 403, 404, 422 (any 4xx but
    408/409/429) ``false``, since the same bytes with the same upstream key are refused again;
    408, 409, 429, 502, 503 and 504 ``true``. Any other status (500, 501, ...) keeps whatever the
    upstream said, or nothing: the SDK's default then decides. Only flows that went upstream
    on the chat path are touched: an egress passthrough's answers are the other site's own.
    """

    @guarded_response
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or resp.status_code < 400:
            return
        if not flowstate.has_passed(flow, Stage.UPSTREAM):
            return
        retry = should_retry(resp.status_code, None)
        if retry is not None:
            resp.headers[SHOULD_RETRY] = "true" if retry else "false"
