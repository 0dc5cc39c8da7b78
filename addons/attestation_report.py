"""``GET /v1/attestation/report``: the gateway's verdict and the evidence behind it.

``?model=<id>`` answers the cached verdict the gate is using for that model, with the evidence
exactly as the upstream sent it (quote, event log, signing address, collateral when the
upstream ships any), so a client can repeat the verification itself. ``&nonce=<64 hex>`` asks
for fresh evidence bound to the client's own nonce instead: proof of freshness the client does
not have to take from us. That verdict answers the client only; the gate keeps relying on
nonces the gateway chose.

With a Chutes upstream the verdict lists every instance checked (``attestation.instances``),
and ``&nonce=`` re-verifies them all against the client's nonce.

In flag mode nothing is verified, so the report carries no verdict (``verified`` is false) and
any evidence it carries is the upstream's, unchecked.

This addon runs before the Router (which would 404 the path), after the API-key check. For
``/v1/models`` it only waits, bounded, for first verdicts of models that just appeared, so the
list the Router then serves is not missing them for a moment.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.attestation import AttestationSync
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.errors import (
    GatewayError,
    guarded,
    json_response,
    method_not_allowed,
    refuse,
)
from teegate.addons.flowstate import Route
from teegate.catalog.attestation import Verdict

REPORT_PATH = "/v1/attestation/report"
FIRST_VERDICT_WAIT_S = 5.0


def _invalid(param: str, message: str, status: int = 400, code: str = "invalid_value"):
    return GatewayError(status, message, code, param=param)


def parse_nonce(text: str | None) -> bytes | None:
    """The client's nonce: exactly 32 bytes as 64 hex digits (None when not given)."""
    if text is None:
        return None
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        nonce = b""
    if len(nonce) != 32 or len(text) != 64:
        raise _invalid("nonce", "Invalid value for 'nonce': must be 64 hex digits (32 bytes).")
    return nonce


class AttestationReport:
    def __init__(self, catalog: CatalogSync, attestation: AttestationSync) -> None:
        self._sync = catalog
        self._att = attestation

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flowstate.route(flow) == Route.PASSTHROUGH:
            return
        path = flow.request.path.split("?", 1)[0]
        if path == "/v1/models" or path.startswith("/v1/models/"):
            await self._settle_listing()
            return
        if path != REPORT_PATH:
            return
        flowstate.set_route(flow, Route.LOCAL)
        method = flow.request.method.upper()
        if method != "GET":
            refuse(flow, method_not_allowed(method, path, "GET"))
            return
        try:
            flow.response = json_response(200, await self._report(flow.request.query))
        except GatewayError as e:
            refuse(flow, e)

    async def _settle_listing(self) -> None:
        catalog = self._sync.catalog
        snap = catalog.snapshot if catalog is not None else None
        if snap is not None:
            await self._att.first_verdicts(snap.models, FIRST_VERDICT_WAIT_S)

    def _model(self, model_id: str) -> str:
        snap = self._sync.current()
        if model_id in snap.models:
            return model_id
        if model_id in snap.non_confidential:
            raise _invalid(
                "model",
                f"Model '{model_id}' is not Confidential Compute.",
                404,
                "model_not_confidential",
            )
        shown = model_id if len(model_id) <= 200 else model_id[:200] + "..."
        raise _invalid("model", f"The model '{shown}' does not exist.", 404, "model_not_found")

    async def _report(self, query: Any) -> dict[str, Any]:
        model_id = query.get("model")
        if not model_id:
            raise _invalid(
                "model", "Missing required parameter: 'model'.", code="missing_required_parameter"
            )
        algo = query.get("signing_algo", "ecdsa")
        if algo != "ecdsa":
            raise _invalid("signing_algo", "Invalid value for 'signing_algo': only 'ecdsa'.")
        nonce = parse_nonce(query.get("nonce"))
        model = self._model(model_id)
        if not self._att.started:
            raise GatewayError(503, self._att.refusal(model) or "", "attestation_unavailable")
        if nonce is not None:
            verdict: Verdict | None = await self._att.attest_now(model, nonce)
        else:
            await self._att.first_verdicts([model], FIRST_VERDICT_WAIT_S)
            verdict = self._att.verdict(model)
            if verdict is None:
                raise GatewayError(
                    503,
                    f"Model '{model}' has not been attested yet; retry shortly.",
                    "attestation_pending",
                    type="api_error",
                )
        return self.body(model, verdict, nonce)

    def body(self, model: str, verdict: Verdict, nonce: bytes | None) -> dict[str, Any]:
        """The report of ``model`` from ``verdict`` (also what the admin API shows)."""
        refusal = self._att.refusal(model)
        dcap = verdict.mode == "dcap"
        return {
            "object": "attestation.report",
            "model": model,
            "mode": self._att.mode,
            "verified": dcap and verdict.ok,
            "fresh": nonce is not None,
            "nonce": nonce.hex() if nonce is not None else verdict.nonce,
            "served": refusal is None,
            "refusal": refusal,
            # flag mode verified nothing: no verdict to show, only what the upstream sent.
            "verdict": verdict.summary() if dcap else None,
            "evidence": verdict.evidence,
            # Which evidence format verified it, which instances, whether chats are sealed.
            "attestation": self._att.instances(verdict) if dcap else None,
        }
