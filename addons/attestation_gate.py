"""The attestation half of the gate, and the headers saying what backed each response.

After the catalog gate approved a chat completion, the model must also hold a passing cached
verdict (dcap mode: a verified TDX quote, not yet expired; flag mode: the catalog's flag).
Otherwise ``400 model_not_confidential``, with the verdict's reason, and nothing goes upstream.
The stage this records (``attestation``) is one Seal requires.

Every response the gateway gives says which mode made the decision
(``x-teegate-attestation-mode``); a served chat completion in dcap mode also carries the
verdict it was served under: when it was verified, the quote's SHA-256, the signing address
and the root the quote chained to. A gateway in flag mode sends none of those, so it never
appears to claim a hardware verification it did not make. The gate records a served chat's
headers; :class:`~addons.headers.ResponseHeaders` writes them, drops any the upstream sent under
these names, and gives every other response the mode (:func:`response_headers`).

Every response also says whether it was end-to-end encrypted (``x-teegate-e2ee``): ``true``
only for a chat sealed to a verified Chutes instance (which also names that instance,
``x-teegate-instance-id``, and its own quote's hash), ``false`` everywhere else. With a Chutes
upstream a model none of whose instances verified is refused ``503 no_attested_instance``.
"""

from __future__ import annotations

from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.attestation import AttestationSync
from teegate.addons.chutes import E2EE_HEADER, INSTANCE_HEADER, no_attested_instance
from teegate.addons.errors import guarded, refuse
from teegate.addons.flowstate import Stage
from teegate.addons.gate import not_confidential
from teegate.addons.headers import ResponseHeaders, add_headers
from teegate.addons.response_guard import RECEIPT_HEADER
from teegate.catalog.attestation import Verdict

MODE = "x-teegate-attestation-mode"
ATTESTED_AT = "x-teegate-attested-at"
QUOTE_SHA256 = "x-teegate-quote-sha256"
SIGNING_ADDRESS = "x-teegate-signing-address"
ROOT = "x-teegate-attestation-root"
RECEIPT = RECEIPT_HEADER
"""The id of the chat's signed receipt (:mod:`teegate.addons.receipts`)."""
ALL = (
    MODE, ATTESTED_AT, QUOTE_SHA256, SIGNING_ADDRESS, ROOT, E2EE_HEADER, INSTANCE_HEADER, RECEIPT
)
FIRST_VERDICT_WAIT_S = 5.0


def verdict_headers(mode: str, verdict: Verdict | None) -> dict[str, str]:
    """What a chat completion served under ``verdict`` says about it."""
    headers = {MODE: mode}
    if mode == "dcap" and verdict is not None and verdict.mode == "dcap" and verdict.ok:
        headers[ATTESTED_AT] = str(verdict.verified_at)
        if verdict.quote_sha256:
            headers[QUOTE_SHA256] = verdict.quote_sha256
        if verdict.signing_address:
            headers[SIGNING_ADDRESS] = verdict.signing_address
        if verdict.root:
            headers[ROOT] = verdict.root
    return headers


def response_headers(attestation: AttestationSync) -> ResponseHeaders:
    """The header writer, speaking alone for the attestation headers."""
    return ResponseHeaders(own=ALL, defaults=lambda: {MODE: attestation.mode, E2EE_HEADER: "false"})


class AttestationGate:
    def __init__(self, attestation: AttestationSync) -> None:
        self._att = attestation

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if not flowstate.is_chat(flow) or not flowstate.has_passed(flow, Stage.GATE):
            return
        model_id = flowstate.catalog_model(flow).id
        if self._att.pending(model_id):
            await self._att.first_verdicts([model_id], FIRST_VERDICT_WAIT_S)
        # Read once, with no await in between: the verdict checked is the one reported.
        verdict = self._att.verdict(model_id)
        why = self._att.refusal(model_id)
        if why is not None:
            if self._att.per_instance:  # Chutes: the model is listed, no instance verified
                refuse(flow, no_attested_instance(model_id, why))
            else:
                refuse(flow, not_confidential(model_id, None, why))
            return
        add_headers(flow, verdict_headers(self._att.mode, verdict))
        if verdict is not None:
            flowstate.set_verdict(flow, verdict)  # the receipt cites the verdict relied on
        flowstate.passed(flow, Stage.ATTESTATION)
