"""Signed receipts for served chats, and the endpoints that hand them (and the key) out.

Every chat completion that reached the upstream and was answered gets ``x-teegate-receipt:
<id>`` in its response headers (written before a stream's first byte), and every id a client
was handed resolves to a signed statement of what happened. When the answer has been relayed
whole (a plain answer, or a stream that ended normally), the receipt says ``"outcome":
"complete"``: hashes of the request sent and of the bytes received and relayed, the model, the
time and the verdict the gate relied on, signed with the gateway's Ed25519 key
(:mod:`teegate.catalog.attestation.receipts`). A stream cut after its headers went out (the
upstream broke off, the client left, a gateway fault or a failed model / E2EE check ended it)
gets ``"outcome": "incomplete"`` with ``incomplete.reason``, the hash and byte count of what was
relayed, and the hash of the prefix received under its own name: never a ``response_sha256``
(the upstream signs only a whole answer; no signature check is queued, ``not_applicable``). An
answer withheld before its headers left (a plain answer replaced by an error envelope) was never
given its id: that promise is withdrawn (404).

A fault in :class:`ReceiptIssuer` itself leaves the promise open; :class:`ReceiptRelease`, the
next addon, resolves it (``receipt_lost`` in the log) so the id answers 404 at once instead of
after ``ISSUE_WAIT_S``. It signs nothing then: after a fault the issuer's state is unknown, and
a receipt must not vouch for what the gateway cannot.

Under a NEAR AI / Phala verdict the receipt starts with ``upstream_signature.status =
"pending"``; the upstream's signature is checked in the background (:mod:`.signatures`) and the
receipt re-issued with the outcome (``revision`` 2). ``GET /v1/receipts/{id}`` answers the
newest revision to the API key that made the request, and 404 to every other key (as for an
unknown id: no key learns that another's receipt exists). An id whose chat is still finishing
is waited for, briefly. ``GET /v1/attestation/gateway`` gives the public key (and, in a TD,
the gateway's own quote binding it; ``?nonce=<64 hex>`` for a fresh one).

The receipt is issued by :class:`ReceiptIssuer`, near the end of the chain, so it describes
what the client received: ``response_sha256`` hashes the bytes the upstream sent (and signed),
``relayed_sha256`` those relayed, which differ for a ``/v1/responses`` call (the client gets
the chat answer translated) and when the usage chunk the gateway asked for is removed.

Receipts are kept in memory and written to the ledger database in batches, off the response
path (:mod:`.receipt_book`), with the signature outcome on the usage row.

Why this module is long: a receipt is promised, issued and re-issued (with the signature's
outcome) by one object that holds the signing key and the book, and the endpoints that hand
receipts and the key out read that same state; the storage (:mod:`.receipt_book`) and the
signature checks (:mod:`.signatures`) are already their own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mitmproxy import http

from teegate.addons import flowstate
from teegate.addons.attestation_gate import RECEIPT
from teegate.addons.attestation_report import parse_nonce
from teegate.addons.errors import (
    GatewayError,
    error_category,
    guarded,
    json_response,
    method_not_allowed,
    refuse,
)
from teegate.addons.flowstate import FailedClosed, Route, Stage
from teegate.addons.headers import add_headers
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.receipt_book import ReceiptBook
from teegate.addons.response_guard import guarded_response
from teegate.addons.signatures import SignatureChecker, SignatureJob, SignatureResult
from teegate.catalog.attestation.gateway_quote import (
    QuoteProvider,
    TsmQuoteProvider,
    gateway_report_data,
)
from teegate.catalog.attestation.gpu import GpuVerdict
from teegate.catalog.attestation.receipts import (
    RECEIPT_VERSION,
    ReceiptSigner,
    canonical,
    load_or_create_key,
    public_hex,
)

if TYPE_CHECKING:
    from teegate.addons.attestation import AttestationSync
    from teegate.addons.metrics import Meter
    from teegate.catalog.attestation import Verdict
    from teegate.config import ReceiptSettings, SignatureSettings, UpstreamSettings

log = structlog.get_logger("teegate.receipts")

RECEIPTS_PATH = "/v1/receipts/"
GATEWAY_PATH = "/v1/attestation/gateway"
ISSUE_WAIT_S = 5.0


def _gpu_part(gpu: GpuVerdict | str) -> dict[str, Any] | str:
    """The GPU verdict's outcome, and the SHA-256 of its full report (the ``gpu`` object of
    ``GET /v1/attestation/report``, canonical JSON): every GPU's details in every receipt made
    each one ~3 kB with two GPUs (~10 kB with eight), signed and written per chat."""
    if not isinstance(gpu, GpuVerdict):
        return gpu
    report = gpu.model_dump(mode="json")
    return {
        "ok": gpu.ok,
        "root": gpu.root,
        "gpu_count": gpu.gpu_count,
        "measurements": gpu.measurements,
        "revocation": gpu.revocation,
        "report_sha256": hashlib.sha256(canonical(report)).hexdigest(),
    }


class Receipts:
    def __init__(
        self,
        settings: ReceiptSettings,
        signatures: SignatureSettings,
        upstream: UpstreamSettings,
        attestation: AttestationSync,
        link: LedgerLink,
        quote_provider: QuoteProvider | None = None,
        meter: Meter | None = None,
    ) -> None:
        self._settings = settings
        self._meter = meter
        self._sig_settings = signatures
        self._upstream = upstream
        self._att = attestation
        self._link = link
        self._policy_sha256 = hashlib.sha256(
            canonical(attestation.policy.model_dump(mode="json"))
        ).hexdigest()
        self._provider = quote_provider
        if self._provider is None and settings.quote_provider is not None:
            self._provider = TsmQuoteProvider(settings.quote_provider)
        self._key: Ed25519PrivateKey | None = None
        self._quote: bytes | None = None
        self.book = ReceiptBook(link)
        self._verdict_parts: dict[str, tuple[Verdict, dict[str, Any]]] = {}
        self._reissuing: set[asyncio.Task[None]] = set()
        self.checker: SignatureChecker | None = None
        self.issuer = ReceiptIssuer(self)
        self.release_open = ReceiptRelease(self)

    # -- life cycle --------------------------------------------------------------------

    async def running(self) -> None:
        self._key = load_or_create_key(self._settings.key_path)
        if self._provider is not None:
            data = gateway_report_data(bytes.fromhex(public_hex(self._key)))
            try:
                self._quote = await asyncio.to_thread(self._provider, data)
            except Exception as e:  # served without a quote; said so in the endpoint
                log.error("gateway_quote_failed", error=type(e).__name__)
        self.book.start(ReceiptSigner(self._key))
        if self._sig_settings.check and self._upstream.kind == "near":
            self.checker = SignatureChecker(
                origin=self._upstream.origin,
                api_key=self._upstream.resolved_api_key,
                withdraw=self._att.withdraw,
                on_result=self._signature_checked,
                queue_size=self._sig_settings.queue,
                workers=self._sig_settings.workers,
                timeout_s=self._sig_settings.timeout_s,
                max_lag_s=self._sig_settings.max_lag_s,
                verify=self._upstream.verify,
            )
            self.checker.start()

    async def done(self) -> None:
        if self.checker is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.checker.drain(), 5.0)
            await self.checker.stop()
        if self._reissuing:
            await asyncio.gather(*self._reissuing, return_exceptions=True)
        await self.book.stop()

    # -- the endpoints -----------------------------------------------------------------

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flowstate.route(flow) == Route.PASSTHROUGH:
            return
        path, _, _ = flow.request.path.partition("?")
        if path != GATEWAY_PATH and not path.startswith(RECEIPTS_PATH):
            return
        flowstate.set_route(flow, Route.LOCAL)
        method = flow.request.method.upper()
        if method != "GET":
            refuse(flow, method_not_allowed(method[:16], path[:200], "GET"))
            return
        try:
            if path == GATEWAY_PATH:
                body = await self._gateway(parse_nonce(flow.request.query.get("nonce")))
            else:
                body = await self._receipt(flow, path.removeprefix(RECEIPTS_PATH))
        except GatewayError as e:
            refuse(flow, e)
            return
        flow.response = json_response(200, body)

    async def _gateway(self, nonce: bytes | None) -> dict[str, Any]:
        key = self._need_key()
        pub = public_hex(key)
        quote = self._quote
        if nonce is not None and self._provider is not None:
            data = gateway_report_data(bytes.fromhex(pub), nonce)
            try:
                quote = await asyncio.to_thread(self._provider, data)
            except Exception as e:
                log.error("gateway_quote_failed", error=type(e).__name__)
                raise GatewayError(
                    503,
                    "The gateway could not make a fresh quote.",
                    "attestation_unavailable",
                    type="api_error",
                ) from None
        return {
            "object": "attestation.gateway",
            "algorithm": "ed25519",
            "public_key": pub,
            "receipt_version": RECEIPT_VERSION,
            "quote": quote.hex() if quote is not None else None,
            "nonce": (nonce or bytes(32)).hex() if quote is not None else None,
            "report_data_layout": "public_key[32] || nonce[32]",
        }

    async def _receipt(self, flow: http.HTTPFlow, receipt_id: str) -> dict[str, Any]:
        key = flowstate.need(flowstate.api_key(flow), "api key")
        not_found = GatewayError(404, "No such receipt for this API key.", "receipt_not_found")
        if not receipt_id or len(receipt_id) > 64:
            raise not_found
        doc = await self.book.get(receipt_id, key.key_id, ISSUE_WAIT_S)
        if doc is None:
            raise not_found
        return doc

    def _need_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            raise GatewayError(
                503, "Receipts are not available yet.", "receipts_unavailable", type="api_error"
            )
        return self._key

    # -- issuing -----------------------------------------------------------------------

    @guarded_response
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Promise a receipt before the answer's first byte leaves."""
        if flowstate.route(flow) != Route.CHAT or not flowstate.has_passed(flow, Stage.UPSTREAM):
            return
        resp, key = flow.response, flowstate.api_key(flow)
        if resp is None or resp.status_code >= 400 or key is None or self._key is None:
            return
        receipt_id = "rcpt_" + secrets.token_hex(16)
        flowstate.set_receipt_id(flow, receipt_id)
        self.book.promise(receipt_id, key.key_id)
        add_headers(flow, {RECEIPT: receipt_id})

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        """Hash a plain answer's body as the upstream sent it, before a later addon translates
        it (the Responses API); :class:`ReceiptIssuer` issues the receipt at the end."""
        resp = flow.response
        if flowstate.receipt_id(flow) is None or resp is None or resp.stream:
            return
        body_sha256 = hashlib.sha256(resp.content or b"").hexdigest()
        flowstate.set_upstream_answer(flow, body_sha256, _completion_id(flow))

    def issue(self, flow: http.HTTPFlow) -> None:
        """Issue the promised receipt: ``complete`` if the client got the answer whole,
        ``incomplete`` if a stream whose headers (and id) went out was cut; else (an answer
        withheld before its headers left: the client never saw the id) withdraw it."""
        receipt_id = flowstate.receipt_id(flow)
        if receipt_id is None:
            return
        try:
            if self._answered_whole(flow):
                self._issue(flow, receipt_id, None)
                self._count("complete")
            elif (cut := _cut_reason(flow)) is not None:
                self._issue(flow, receipt_id, cut)
                self._count("incomplete", cut)
            else:
                flowstate.response_headers(flow).pop(RECEIPT, None)
                if flow.response is not None:  # already written (a later addon replaced it)
                    flow.response.headers.pop(RECEIPT, None)
                self._count("withdrawn")
        except Exception as e:  # the client has its answer; the receipt is what is lost
            rid = flowstate.request_id(flow)
            log.error("receipt_failed", request_id=rid, error=type(e).__name__)
            self._count("lost", "issue_failed")
        finally:
            self.book.settled(receipt_id)

    def unanswered(self, flow: http.HTTPFlow) -> None:
        """The flow ended in an error (upstream or client gone mid-stream): a stream whose
        headers went out gets an ``incomplete`` receipt for what was relayed."""
        receipt_id = flowstate.receipt_id(flow)
        if receipt_id is None:
            return
        try:
            cut = _cut_reason(flow)
            if cut is not None:
                self._issue(flow, receipt_id, cut)
                self._count("incomplete", cut)
            else:  # no headers went out: the client never saw the id
                self._count("withdrawn")
        except Exception as e:
            rid = flowstate.request_id(flow)
            log.error("receipt_failed", request_id=rid, error=type(e).__name__)
            self._count("lost", "issue_failed")
        finally:
            self.book.settled(receipt_id)

    def release(self, flow: http.HTTPFlow) -> None:
        """Resolve a promise still open once the flow ended (the issuer itself failed): its
        id answers 404 at once instead of after ``ISSUE_WAIT_S``.

        It cannot raise: settling is a read of the flow's metadata and a dict pop plus an
        ``Event.set`` (neither raises for a key present), done first; what follows (counting,
        logging) is suppressed. Were it to fail anyway, the book expires the promise
        (:data:`~teegate.addons.receipt_book.PROMISE_MAX_AGE_S`): the table never leaks."""
        try:
            receipt_id = flowstate.receipt_id(flow)
            if receipt_id is None or not self.book.promised(receipt_id):
                return
            self.book.settled(receipt_id)
        except Exception as e:  # pragma: no cover - see above; the book's expiry remains
            log.error("receipt_release_failed", error=type(e).__name__)
            return
        with contextlib.suppress(Exception):  # the promise is settled: nothing else matters
            failed = flowstate.failed_closed(flow)
            if failed is not None and failed[0] == FailedClosed.WITHHELD:
                # The issuer's fault withheld the answer: its envelope carries no receipt id, so
                # the client never saw one. Nothing was lost to it.
                self._count("withdrawn", "issuer_fault")
                return
            self._count("lost", "issuer_fault")
            log.error("receipt_lost", request_id=flowstate.request_id(flow))

    def _count(self, outcome: str, reason: str = "") -> None:
        """``teegate_receipts_total``: how each promise ended (never raises: a metric must not
        turn an issued receipt into a lost one)."""
        if self._meter is None:
            return
        try:
            self._meter.receipt(outcome, reason)
        except Exception as e:
            log.error("metrics_failed", error=type(e).__name__)

    @staticmethod
    def _answered_whole(flow: http.HTTPFlow) -> bool:
        resp = flow.response
        if resp is None or resp.status_code >= 400 or flowstate.error_code(flow) is not None:
            return False
        if flow.error is not None:
            return False
        tally = flowstate.stream_tally(flow)
        if tally is None:
            return True
        return tally.complete and not (tally.model_mismatch or tally.e2ee_failed or tally.opaque)

    def _issue(self, flow: http.HTTPFlow, receipt_id: str, cut: str | None) -> None:
        """Issue revision 1; ``cut`` names why a stream did not complete (``None``: it did)."""
        key = flowstate.need(flowstate.api_key(flow), "api key")
        verdict = flowstate.verdict(flow)
        tally = flowstate.stream_tally(flow)
        sent = flow.request.content or b""
        if tally is not None:
            received, relayed = tally.received.hexdigest(), tally.relayed.hexdigest()
            completion_id, relayed_bytes = tally.completion_id, tally.relayed_bytes
        else:
            body = flow.response.content if flow.response is not None else b""
            relayed, relayed_bytes = hashlib.sha256(body or b"").hexdigest(), len(body or b"")
            received, completion_id = flowstate.need(
                flowstate.upstream_answer(flow), "upstream answer"
            )
        request_sha256 = hashlib.sha256(sent).hexdigest()
        res = flowstate.reservation(flow)
        checking = cut is None and self._expects_signature(verdict)
        status = "pending" if checking else "not_applicable"
        if checking and self.checker is None:
            status = "unchecked"
        body = {
            "version": RECEIPT_VERSION,
            "id": receipt_id,
            "revision": 1,
            "issued_at": int(time.time()),
            "request_id": flowstate.request_id(flow),
            "model": flowstate.catalog_model(flow).id,
            "stream": tally is not None,
            "completion_id": completion_id,
            "outcome": "complete" if cut is None else "incomplete",
            "request_sha256": request_sha256,
            "response_sha256": received if cut is None else None,
            "relayed_sha256": relayed,
            "relayed_bytes": relayed_bytes,
            "verdict": self._verdict_part(flowstate.catalog_model(flow).id, verdict),
            "upstream_signature": {"status": status},
        }
        if cut is not None:
            # Never a response_sha256 (the upstream's signature covers only a whole answer):
            # the hash of the prefix received, under its own name, and why it stopped.
            body["incomplete"] = {"reason": cut, "received_sha256": received}
        if status == "pending" and self.checker is not None:
            job = SignatureJob(
                request_id=str(flowstate.request_id(flow)),
                model=body["model"],
                upstream_model=flowstate.upstream_model(flow) or body["model"],
                completion_id=completion_id or "",
                request_sha256=request_sha256,
                response_sha256=received,
                attested=tuple(verdict.signing_addresses) if verdict is not None else (),
                receipt_id=receipt_id,
                reservation_id=res.id if res is not None else None,
                key_id=key.key_id,
            )
            if not completion_id:
                self._store(body, key.key_id, res.id if res else None)
                self._signature_checked(job, SignatureResult("missing", "the answer has no id"))
                self._att.withdraw(body["model"], "response signature missing: answer has no id")
                return
            if not self.checker.submit(job):
                body["upstream_signature"] = {"status": "unchecked"}
                if self._meter is not None:
                    self._meter.signature(body["model"], "unchecked")
        self._store(body, key.key_id, res.id if res is not None else None)

    def _expects_signature(self, verdict: Verdict | None) -> bool:
        return (
            verdict is not None
            and verdict.mode == "dcap"
            and getattr(verdict, "evidence_kind", "near") == "near"
            and self._upstream.kind == "near"
        )

    def _verdict_part(self, model: str, v: Verdict | None) -> dict[str, Any]:
        """The verdict as a receipt names it; built once per verdict (every chat under the same
        verdict shares it)."""
        if v is None:
            return {"mode": self._att.mode, "policy_sha256": self._policy_sha256}
        hit = self._verdict_parts.get(model)
        if hit is not None and hit[0] is v:
            return hit[1]
        part = {
            "mode": v.mode,
            "verified_at": v.verified_at,
            "quote_sha256": v.quote_sha256,
            "signing_address": v.signing_address,
            "tcb_status": v.tcb_status,
            "root": v.root,
            "gpu": _gpu_part(v.gpu),
            "policy_sha256": self._policy_sha256,
        }
        self._verdict_parts[model] = (v, part)  # one entry per catalog model
        return part

    def _store(self, body: dict[str, Any], key_id: int, reservation_id: int | None) -> None:
        status = body["upstream_signature"]["status"]
        row = None
        if reservation_id is not None and status != "not_applicable":
            row = (reservation_id, status)
        self._need_key()  # no receipt is promised without a key; a guard, not a branch
        self.book.put(body, key_id, row)

    def _signature_checked(self, job: SignatureJob, result: SignatureResult) -> None:
        """Re-issue the receipt with the upstream's signature and its outcome."""
        if self._meter is not None:
            self._meter.signature(job.model, result.status)
        if job.receipt_id is None:
            return
        kept = self.book.kept(job.receipt_id)
        if kept is None:  # more chats since than receipts kept in memory: read it back
            task = asyncio.create_task(self._reissue_stored(job, result))
            self._reissuing.add(task)
            task.add_done_callback(self._reissuing.discard)
            return
        self._reissue(kept[0], kept[1], job, result)

    def _reissue(
        self, key_id: int, kept: dict[str, Any], job: SignatureJob, result: SignatureResult
    ) -> None:
        body = dict(kept)
        body["revision"] = int(body["revision"]) + 1
        body["upstream_signature"] = result.to_json()
        self._store(body, key_id, job.reservation_id)

    async def _reissue_stored(self, job: SignatureJob, result: SignatureResult) -> None:
        """The receipt from the database (it left memory), re-issued with the outcome."""
        assert job.receipt_id is not None
        stored = None
        try:
            if job.key_id is not None:
                stored = await self._link.get().receipt(job.receipt_id, job.key_id)
        except Exception as e:  # the usage row still gets the outcome
            log.error("receipt_reload_failed", request_id=job.request_id, error=type(e).__name__)
        if stored is None or job.key_id is None:
            log.warning("receipt_gone_before_signature", request_id=job.request_id)
            if job.reservation_id is not None:
                self.book.signature_row(job.reservation_id, result.status)
            return
        body = json.loads(stored)["receipt"]
        if body.get("upstream_signature", {}).get("status") == "pending":
            self._reissue(job.key_id, body, job, result)


def _cut_reason(flow: http.HTTPFlow) -> str | None:
    """Why a stream whose headers (with the receipt id) reached the client did not complete;
    ``None`` when no headers went out (an answer withheld whole: the client never saw the id)."""
    tally, resp = flowstate.stream_tally(flow), flow.response
    if tally is None or resp is None or resp.status_code >= 400:
        return None
    failed = flowstate.failed_closed(flow)
    if failed is not None and failed[0] == FailedClosed.WITHHELD:
        return None
    # What ended the stream first: the gateway's own end (one error event) comes before the
    # client leaving or the upstream closing after it, which only follow from it.
    if failed is not None:
        return "gateway_error"  # a fault cut the stream (one error event ended it)
    if tally.model_mismatch:
        return "model_mismatch"
    if tally.e2ee_failed:
        return "upstream_error" if flowstate.error_code(flow) == "upstream_error" else "e2ee_failed"
    if tally.opaque:
        return "unreadable"
    if flow.error is not None:
        category = error_category(flow.error.msg)
        if category == "client_disconnected":
            return "client_disconnected"
        if category in ("upstream_disconnected", "invalid_http", "tls_failed"):
            return "upstream_aborted"
        if flowstate.timed_out(flow) or category == "timeout":
            return "deadline"
        return "gateway_error"  # killed (drain, shutdown) or anything unnamed
    if not tally.complete:
        return "upstream_aborted"
    return "gateway_error"  # not whole for another reason (an error code was recorded)


class ReceiptIssuer:
    """Issues the receipts :class:`Receipts` promised, once every addon that may still replace
    or translate the answer ran (a fault failing it closed, :class:`~teegate.addons.responses.
    ResponsesOut`): a receipt describes what the client received, and none is issued for an
    answer the client never got. Mounted near the end of the chain; one per :class:`Receipts`.
    """

    def __init__(self, receipts: Receipts) -> None:
        self._receipts = receipts

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        self._receipts.issue(flow)

    @guarded_response
    def error(self, flow: http.HTTPFlow) -> None:
        self._receipts.unanswered(flow)


class ReceiptRelease:
    """Mounted right after :class:`ReceiptIssuer`: a promise the issuer left open (it raised
    before issuing or settling) is resolved here, so ``GET /v1/receipts/{id}`` answers 404 at
    once rather than waiting ``ISSUE_WAIT_S`` for a receipt that can never come. No receipt is
    signed then: the issuer's state after a fault is unknown, and a receipt must not state
    what the gateway cannot vouch for."""

    def __init__(self, receipts: Receipts) -> None:
        self._receipts = receipts

    @guarded_response
    def response(self, flow: http.HTTPFlow) -> None:
        self._receipts.release(flow)

    @guarded_response
    def error(self, flow: http.HTTPFlow) -> None:
        self._receipts.release(flow)


def _completion_id(flow: http.HTTPFlow) -> str | None:
    try:
        doc = flow.response.json() if flow.response is not None else None
    except ValueError:
        return None
    cid = doc.get("id") if isinstance(doc, dict) else None
    return cid if isinstance(cid, str) and 0 < len(cid) <= 200 else None
