"""Where issued receipts live: in memory while fresh, in the ledger database for good.

Issuing happens in a response hook, so nothing here waits on the database there: a receipt is
put in a bounded in-memory map (what ``GET /v1/receipts/{id}`` reads first) and queued; a
writer task commits what queued up within 50 ms in one transaction
(:meth:`teegate.ledger.Ledger.write_receipts`), with the usage rows' signature outcomes.
A receipt promised in a response header but not yet issued (a stream still finishing) can be
waited for, briefly, by the key that owns it.

A receipt is signed when it leaves memory: to the key holder who asks for it, or to the
database. A revision that a later one replaces before either (revision 1 ``pending``, replaced
by the signature check's outcome within milliseconds) is never signed nor written: one Ed25519
signature and one row per chat instead of two. What reaches the database is as durable as
before (written within ``WRITE_LINGER_S`` either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from teegate.addons.ledgerlink import LedgerLink
from teegate.catalog.attestation.receipts import ReceiptSigner
from teegate.ledger import LedgerUnavailable
from teegate.ledger.receipts import StoredReceipt

log = structlog.get_logger("teegate.receipts")

# Enough to answer a receipt asked for right after its answer, and to re-issue it with its
# signature outcome (checks wait at most signatures.max_lag_s: 2048 covers ~1000 chats/s; older
# ones are read back from the database, which has every receipt within WRITE_LINGER_S). At ~5 kB
# each (the GPU report inline), 4096 grew a gateway's RSS by ~20 MB; now ~1.5 kB each.
KEPT_IN_MEMORY = 2048
WRITE_LINGER_S = 0.05
# While the database is unavailable, receipts and signature outcomes wait (written again every
# RETRY_S, in order: the upsert keeps the newest revision); beyond MAX_PENDING the oldest go.
RETRY_S = 1.0
MAX_PENDING = 4096
# A promise is settled when its flow ends (ReceiptIssuer, then ReceiptRelease, which cannot
# raise). Should neither run, the table still cannot grow: a promise older than this (no chat
# streams for an hour) or past this many open at once (far above any concurrency) is settled
# as it is found, oldest first. Settling only ends the wait of ``get``: a receipt issued later
# is still kept and served.
PROMISE_MAX_AGE_S = 3600.0
MAX_PROMISES = 65_536


@dataclass(slots=True)
class _Entry:
    key_id: int
    body: dict[str, Any]
    created_ms: int
    signed: tuple[dict[str, Any], str] | None = None
    """(document, its canonical JSON) once signed."""


class ReceiptBook:
    def __init__(
        self,
        link: LedgerLink,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_promises: int = MAX_PROMISES,
    ) -> None:
        self._link = link
        self._signer: ReceiptSigner | None = None
        self._recent: OrderedDict[str, _Entry] = OrderedDict()
        self._issuing: OrderedDict[str, tuple[int, asyncio.Event, float]] = OrderedDict()
        """Open promises, oldest first: (key id, set when settled, promised at)."""
        self._clock = clock
        self._max_promises = max_promises
        self._to_write: dict[str, _Entry] = {}
        """The newest unwritten revision of each receipt (kept here even when ``_recent`` has
        let it go, until written)."""
        self._sig_rows: list[tuple[int, str]] = []
        self._dirty = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    def start(self, signer: ReceiptSigner) -> None:
        self._signer = signer
        self._writer = asyncio.create_task(self._write_loop(), name="receipt-writer")

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._flush()

    # -- promised, then issued -----------------------------------------------------------

    def promise(self, receipt_id: str, key_id: int) -> None:
        now = self._clock()
        self._expire(now)
        self._issuing[receipt_id] = (key_id, asyncio.Event(), now)

    def _expire(self, now: float) -> None:
        """Settle the promises no flow end settled (see :data:`PROMISE_MAX_AGE_S`)."""
        issuing = self._issuing
        while issuing:
            rid, (_, _, at) = next(iter(issuing.items()))
            if now - at < PROMISE_MAX_AGE_S and len(issuing) < self._max_promises:
                return
            self.settled(rid)
            log.warning("receipt_promise_expired")

    def promised(self, receipt_id: str) -> bool:
        """Whether ``receipt_id`` is promised and neither issued nor given up yet."""
        return receipt_id in self._issuing

    def settled(self, receipt_id: str) -> None:
        """Issued, or never will be: stop waiting for it."""
        entry = self._issuing.pop(receipt_id, None)
        if entry is not None:
            entry[1].set()

    def put(self, body: dict[str, Any], key_id: int, signature_row: tuple[int, str] | None) -> None:
        """Keep a receipt body (a later revision replaces an earlier) and queue its write."""
        rid = body["id"]
        earlier = self._in_memory(rid)
        created_ms = earlier.created_ms if earlier is not None else int(time.time() * 1000)
        entry = _Entry(key_id, body, created_ms)
        self._recent[rid] = entry
        self._recent.move_to_end(rid)
        while len(self._recent) > KEPT_IN_MEMORY:
            self._recent.popitem(last=False)
        self._to_write[rid] = entry
        if signature_row is not None:
            self._sig_rows.append(signature_row)
        self._dirty.set()

    def signature_row(self, reservation_id: int, status: str) -> None:
        """A usage row's signature outcome alone (its receipt already left memory)."""
        self._sig_rows.append((reservation_id, status))
        self._dirty.set()

    def kept(self, receipt_id: str) -> tuple[int, dict[str, Any]] | None:
        """(key id, newest body) of a receipt still in memory (kept, or not yet written)."""
        entry = self._in_memory(receipt_id)
        return (entry.key_id, entry.body) if entry is not None else None

    def _in_memory(self, receipt_id: str) -> _Entry | None:
        """The newest revision still in memory: kept, or not yet written (kept or not)."""
        return self._recent.get(receipt_id) or self._to_write.get(receipt_id)

    def _signed(self, entry: _Entry) -> tuple[dict[str, Any], str]:
        if entry.signed is None:
            if self._signer is None:
                raise RuntimeError("the receipt book signs only after start()")
            entry.signed = self._signer.sign(entry.body)
        return entry.signed

    async def get(self, receipt_id: str, key_id: int, wait_s: float) -> dict[str, Any] | None:
        """The newest revision, only for ``key_id``; waits up to ``wait_s`` for a promised one."""
        self._expire(self._clock())
        issuing = self._issuing.get(receipt_id)
        if issuing is not None and issuing[0] == key_id:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(issuing[1].wait(), wait_s)
        kept = self._in_memory(receipt_id)
        if kept is not None:
            return self._signed(kept)[0] if kept.key_id == key_id else None
        stored = await self._link.get().receipt(receipt_id, key_id)
        return json.loads(stored) if stored is not None else None

    # -- writing -------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(WRITE_LINGER_S)  # batch what arrives meanwhile: one commit
            self._dirty.clear()
            if not await self._flush():
                await asyncio.sleep(RETRY_S)  # the database is away: try again, not sooner
                self._dirty.set()

    async def _flush(self) -> bool:
        """Write what is queued; False if the ledger was unavailable (kept for a retry)."""
        entries, rows = self._to_write, self._sig_rows
        if not entries and not rows:
            return True
        self._to_write, self._sig_rows = {}, []
        stored: list[StoredReceipt] = []
        try:
            stored = [self._stored(rid, entry) for rid, entry in entries.items()]
            await self._link.get().write_receipts(stored, rows)
        except LedgerUnavailable as e:  # a database restart or failover: kept, in order
            entries.update(self._to_write)  # a revision queued meanwhile replaces its earlier
            kept = list(entries.items())[-MAX_PENDING:]
            self._to_write = dict(kept)
            self._sig_rows = (rows + self._sig_rows)[-MAX_PENDING:]
            log.error("receipt_write_retry", error=type(e).__name__, receipts=len(stored))
            return False
        except Exception as e:  # still served from memory while kept there; not retried
            log.error("receipt_write_failed", error=type(e).__name__, receipts=len(stored))
        return True

    def _stored(self, rid: str, entry: _Entry) -> StoredReceipt:
        return StoredReceipt(
            id=rid,
            key_id=entry.key_id,
            request_id=str(entry.body.get("request_id")),
            revision=int(entry.body["revision"]),
            created_ms=entry.created_ms,
            document=self._signed(entry)[1],
        )
