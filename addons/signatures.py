"""Checking the upstream's response signatures after the client has its answer.

A completed chat served under a NEAR AI / Phala verdict is queued here (a bounded queue; the
response hook only enqueues). Workers fetch ``GET {upstream}/v1/signature/{completion id}
?model=<id>&signing_algo=ecdsa`` with the upstream's key, tried three times (at once, after
0.25 s and after 1 s: a node caches the signature as its stream ends, which can be a moment
after our last byte), and verify it with :func:`teegate.catalog.attestation.signature.
verify_signature` against the addresses of the verdict the chat was served under.

The outcome goes to ``on_result`` (the receipt and the usage row record it). A signature that
is missing or fails withdraws the model's verdict: it is refused until a fresh attestation
passes (:meth:`AttestationSync.withdraw`), tried after ``attestation.retry_interval_s``; when the
signature endpoint could not be reached at all (a network fault, not an upstream that answered
without a signature), the re-attestation is tried at once. A full queue, or a check that waited
in it longer than ``signatures.max_lag_s``, is the gateway's own limit, not the upstream's fault:
that chat is recorded ``unchecked`` (counted; logged at most every 10 s) and the model stays
served. A late check is not even fetched: an upstream keeps only its most recent signatures
(NEAR AI's proxy: a 1,000-entry cache), so one fetched late may be gone, and "missing" would
withdraw a model for the gateway's lag (seen in the benchmark at 32 connections).
Logs name the request id, model and outcome; never the signed text's content (hashes only
anyway) nor the upstream's key.

The fetch uses aiohttp's client rather than httpx (used for the catalog and evidence, which are
rare): one fetch per chat, and aiohttp spends about a third of httpx's CPU on one (measured:
0.76 ms against 2.4 ms per request, both ends on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import structlog
from yarl import URL

from teegate.catalog.attestation.signature import (
    SignatureError,
    SignatureStatus,
    UpstreamSignature,
    verify_signature,
)

log = structlog.get_logger("teegate.signatures")

RETRY_DELAYS_S = (0.0, 0.25, 1.0)
MAX_SIGNATURE_BYTES = 64 * 1024
UNCHECKED_LOG_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class SignatureJob:
    request_id: str
    model: str
    """The catalog id: the verdict withdrawn on failure."""
    upstream_model: str
    completion_id: str
    request_sha256: str
    response_sha256: str
    attested: tuple[str, ...]
    receipt_id: str | None
    reservation_id: int | None
    key_id: int | None = None
    """The API key the receipt belongs to (to find it in the database once out of memory)."""
    queued_at: float = 0.0
    """``time.monotonic()`` when submitted (set by :meth:`SignatureChecker.submit`)."""


@dataclass(frozen=True, slots=True)
class SignatureResult:
    status: SignatureStatus
    reason: str
    document: UpstreamSignature | None = None
    unreachable: bool = False

    def to_json(self) -> dict[str, Any]:
        doc = self.document.to_json() if self.document is not None else {}
        return {"status": self.status, "reason": self.reason, **doc}


class SignatureChecker:
    def __init__(
        self,
        *,
        origin: str,
        api_key: Callable[[], str],
        withdraw: Callable[..., None],
        on_result: Callable[[SignatureJob, SignatureResult], None],
        queue_size: int,
        workers: int,
        timeout_s: float,
        max_lag_s: float = 2.0,
        verify: str | bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = origin.rstrip("/") + "/v1/signature/"
        self._api_key = api_key
        self._withdraw = withdraw
        self._on_result = on_result
        self._queue: asyncio.Queue[SignatureJob] = asyncio.Queue(queue_size)
        self._n_workers = workers
        self._timeout_s = timeout_s
        self._max_lag_s = max_lag_s
        self._verify = verify
        self._clock = clock
        self._skipped = 0
        self._skip_logged_at = -UNCHECKED_LOG_EVERY_S
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if isinstance(self._verify, str):
            return ssl.create_default_context(cafile=self._verify)
        return self._verify

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=self._n_workers),
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            trust_env=False,
            auto_decompress=True,
            # No cookies kept or sent: nothing an upstream sets may ride on the next fetch (and
            # the jar's per-request work is skipped).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._workers = [
            asyncio.create_task(self._work(), name=f"signature-check-{i}")
            for i in range(self._n_workers)
        ]

    async def stop(self) -> None:
        for t in self._workers:
            t.cancel()
        for t in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._workers = []
        if self._session is not None:
            await self._session.close()

    def submit(self, job: SignatureJob) -> bool:
        """Queue a check; False (and the chat is "unchecked") when the queue is full."""
        try:
            self._queue.put_nowait(dataclasses.replace(job, queued_at=self._clock()))
        except asyncio.QueueFull:
            self._unchecked("signature queue full")
            return False
        return True

    def _unchecked(self, reason: str) -> None:
        """Count a check skipped for the gateway's own load; logged at most every 10 s (one
        line per chat would add to the load that caused it). Every one is counted in
        ``teegate_response_signatures_total{status="unchecked"}`` and on its receipt."""
        self._skipped += 1
        now = self._clock()
        if now - self._skip_logged_at >= UNCHECKED_LOG_EVERY_S:
            log.warning("response_signatures_unchecked", count=self._skipped, reason=reason)
            self._skipped, self._skip_logged_at = 0, now

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                result = await self.check(job)
                self._report(job, result)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one job's surprise must not stop the worker
                rid = job.request_id
                log.exception("response_signature_error", request_id=rid, error=type(e).__name__)
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        """Wait until every queued check has finished (tests, shutdown)."""
        await self._queue.join()

    async def check(self, job: SignatureJob) -> SignatureResult:
        lag = self._clock() - job.queued_at
        if job.queued_at and lag > self._max_lag_s:
            return SignatureResult(
                "unchecked", f"not checked: the gateway's signature queue lagged {lag:.1f} s"
            )
        answered, doc = await self._fetch(job)
        if not answered:
            return SignatureResult(
                "missing", "the signature endpoint could not be reached", unreachable=True
            )
        if doc is None:
            return SignatureResult("missing", "the upstream served no signature for this answer")
        try:
            sig = UpstreamSignature.parse(doc)
        except SignatureError as e:
            return SignatureResult("failed", f"unreadable signature: {e}")
        # On the loop, not in a thread: the recovery is ~145 us of CPU, and handing it to a
        # thread and back cost ~250 us more (GIL hand-offs and wake-ups), which the gateway's
        # one core pays for every chat (docs/bench.md, "Session 6").
        check = verify_signature(
            sig,
            request_sha256=job.request_sha256,
            response_sha256=job.response_sha256,
            model=job.upstream_model,
            attested=job.attested,
        )
        return SignatureResult("verified" if check.ok else "failed", check.reason, sig)

    async def _fetch(self, job: SignatureJob) -> tuple[bool, Any]:
        """(whether the upstream answered at all, the signature document or None)."""
        assert self._session is not None, "start() first"
        query = urlencode({"model": job.upstream_model, "signing_algo": "ecdsa"})
        # Encoded by us, exactly once: an id cannot add a path segment or a query parameter.
        url = URL(f"{self._base}{quote(job.completion_id, safe='')}?{query}", encoded=True)
        headers = {"accept": "application/json", "authorization": f"Bearer {self._api_key()}"}
        answered = False
        for delay in RETRY_DELAYS_S:
            if delay:
                await asyncio.sleep(delay)
            try:
                async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                    status = resp.status
                    body = await _read_bounded(resp.content, MAX_SIGNATURE_BYTES + 1)
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
            answered = True
            if status != 200 or len(body) > MAX_SIGNATURE_BYTES:
                continue
            try:
                return True, json.loads(body)
            except ValueError:
                return True, {}  # answered, but not JSON: a failed signature, not a missing one
        return answered, None

    def _report(self, job: SignatureJob, result: SignatureResult) -> None:
        fields = {"request_id": job.request_id, "model": job.model, "status": result.status}
        if result.status == "verified":  # the usual case: counted in the metrics, not logged
            log.debug("response_signature", **fields)
        elif result.status == "unchecked":  # the gateway's own lag: nothing against the upstream
            self._unchecked(result.reason)
        else:
            log.warning("response_signature", **fields, reason=result.reason)
            why = f"response signature {result.status}: {result.reason}"
            self._withdraw(job.model, why, reattest_now=result.unreachable)
        self._on_result(job, result)


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes (more than that is refused by the caller)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)
