"""Receipts: canonical JSON signed with the gateway's Ed25519 key; tampering fails."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.flow import Error
from mitmproxy.test import tflow

from teegate.addons import flowstate
from teegate.addons.flowstate import FailedClosed
from teegate.addons.receipt_book import PROMISE_MAX_AGE_S, ReceiptBook
from teegate.addons.receipts import Receipts, _cut_reason
from teegate.addons.streaming import StreamTally
from teegate.catalog.attestation.receipts import (
    RECEIPT_VERSION,
    ReceiptError,
    ReceiptSigner,
    canonical,
    load_or_create_key,
    public_hex,
    sign_receipt,
    verify_receipt,
)

BODY = {
    "version": RECEIPT_VERSION,
    "id": "rcpt_x",
    "revision": 1,
    "model": "m",
    "issued_at": 1700000000,
    "request_sha256": "ab" * 32,
    "response_sha256": "cd" * 32,
    "verdict": {
        "quote_sha256": "ef" * 32,
        "signing_address": "0x" + "12" * 20,
        "gpu": "unverified",
    },
    "upstream_signature": {"status": "pending"},
}


def test_canonical_is_sorted_and_compact() -> None:
    doc = {"b": 1, "a": [1, {"d": "é", "c": True}]}
    assert canonical(doc) == '{"a":[1,{"c":true,"d":"é"}],"b":1}'.encode()


def test_key_created_once_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "receipt-key.pem"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_hex(load_or_create_key(path)) == public_hex(key)
    os.chmod(path, 0o644)
    with pytest.raises(ReceiptError, match="readable by others"):
        load_or_create_key(path)


def test_sign_verify_and_tamper(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "k.pem")
    doc = sign_receipt(BODY, key)
    assert verify_receipt(doc, public_hex(key)) == BODY
    for path, value in [
        (("model",), "n"),
        (("response_sha256",), "ce" * 32),
        (("verdict", "gpu"), "verified"),
        (("upstream_signature", "status"), "verified"),
        (("revision",), 2),
    ]:
        bad = copy.deepcopy(doc)
        target = bad["receipt"]
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
        with pytest.raises(ReceiptError, match="altered"):
            verify_receipt(bad, public_hex(key))
    other = load_or_create_key(tmp_path / "other.pem")
    with pytest.raises(ReceiptError, match="another signing key"):
        verify_receipt(doc, public_hex(other))
    # Swapping in another key's name and signature does not pass against ours either.
    forged = sign_receipt(BODY, other)
    with pytest.raises(ReceiptError):
        verify_receipt(forged, public_hex(key))


def test_signer_text_is_the_canonical_document(tmp_path: Path) -> None:
    """The stored text is built around the signed bytes; it must equal canonical(doc)."""
    key = load_or_create_key(tmp_path / "k.pem")
    body = {**BODY, "verdict": {**BODY["verdict"], "note": 'quote " and é'}}
    doc, text = ReceiptSigner(key).sign(body)
    assert text.encode() == canonical(doc)
    assert verify_receipt(json.loads(text), public_hex(key)) == body


class _Link:
    """Only what the book calls on the ledger: write_receipts, counted."""

    def __init__(self) -> None:
        self.writes: list[tuple[list[Any], list[tuple[int, str]]]] = []

    def get(self) -> _Link:
        return self

    async def write_receipts(self, stored: list[Any], rows: list[tuple[int, str]]) -> None:
        self.writes.append((stored, rows))

    async def receipt(self, receipt_id: str, key_id: int) -> str | None:
        return None


class _CountingSigner(ReceiptSigner):
    calls = 0

    def sign(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        type(self).calls += 1
        return super().sign(body)


async def test_book_signs_and_writes_only_the_newest_revision(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "k.pem")
    link, signer = _Link(), _CountingSigner(key)
    book = ReceiptBook(link)  # type: ignore[arg-type]
    book._signer = signer  # no writer task: flushed by hand below
    book.put(BODY, 7, (11, "pending"))
    first = book._to_write["rcpt_x"].created_ms
    verified = {**BODY, "revision": 2, "upstream_signature": {"status": "verified"}}
    book.put(verified, 7, (11, "verified"))
    await book._flush()
    [(stored, rows)] = link.writes
    assert [(s.id, s.revision, s.created_ms) for s in stored] == [("rcpt_x", 2, first)]
    assert rows == [(11, "pending"), (11, "verified")]
    assert signer.calls == 1  # revision 1 was replaced before anyone saw it: never signed
    doc = verify_receipt(json.loads(stored[0].document), public_hex(key))
    assert doc["upstream_signature"] == {"status": "verified"}
    # Asked for by its key: served signed, from memory (no second signature); other keys: None.
    assert (await book.get("rcpt_x", 7, 0))["receipt"]["revision"] == 2
    assert await book.get("rcpt_x", 8, 0) is None
    assert signer.calls == 1


async def test_book_signs_a_pending_revision_asked_for_before_its_outcome(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "k.pem")
    link = _Link()
    book = ReceiptBook(link)  # type: ignore[arg-type]
    book._signer = ReceiptSigner(key)
    book.put(BODY, 7, None)
    served = await book.get("rcpt_x", 7, 0)
    assert verify_receipt(served, public_hex(key))["upstream_signature"] == {"status": "pending"}
    await book._flush()
    book.put({**BODY, "revision": 2}, 7, None)
    await book._flush()
    assert [s.revision for stored, _ in link.writes for s in stored] == [1, 2]


class _StoredLink(_Link):
    """A ledger holding one written receipt, as the book wrote it."""

    def __init__(self, text: str, key_id: int) -> None:
        super().__init__()
        self.text, self.key_id = text, key_id

    async def receipt(self, receipt_id: str, key_id: int) -> str | None:
        return self.text if key_id == self.key_id and receipt_id == "rcpt_x" else None


async def test_a_receipt_out_of_memory_is_read_back_and_reissued(tmp_path: Path) -> None:
    """Under load a receipt can leave memory before its signature check ends: it is read back
    from the database and re-issued (revision 2), not left "pending" for good."""
    from teegate.addons.receipts import Receipts
    from teegate.addons.signatures import SignatureJob, SignatureResult

    key = load_or_create_key(tmp_path / "k.pem")
    _, text = ReceiptSigner(key).sign(BODY)
    link = _StoredLink(text, 7)
    receipts = object.__new__(Receipts)  # only what re-issuing reads
    receipts._key, receipts._meter, receipts._link = key, None, link
    receipts._reissuing = set()
    receipts.book = ReceiptBook(link)  # type: ignore[arg-type]
    receipts.book._signer = ReceiptSigner(key)
    job = SignatureJob("r1", "m", "m", "c1", "ab", "cd", (), "rcpt_x", 11, key_id=7)
    assert receipts.book.kept("rcpt_x") is None
    receipts._signature_checked(job, SignatureResult("verified", "ok"))
    for task in list(receipts._reissuing):
        await task
    await receipts.book._flush()
    [(stored, rows)] = link.writes
    assert [s.revision for s in stored] == [2] and rows == [(11, "verified")]
    doc = verify_receipt(json.loads(stored[0].document), public_hex(key))
    assert doc["upstream_signature"]["status"] == "verified"


def _streamed(**tally: Any) -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flowstate.set_stream_tally(flow, StreamTally(**tally))
    return flow


def _errored(msg: str) -> http.HTTPFlow:
    flow = _streamed()
    flow.error = Error(msg)
    return flow


def _failed(how: FailedClosed, error: str | None = None) -> http.HTTPFlow:
    flow = _streamed(complete=True)
    flowstate.set_failed_closed(flow, how, 200)
    flow.error = Error(error) if error is not None else None
    return flow


@pytest.mark.parametrize(
    ("flow", "reason"),
    [
        (_errored("Server disconnected."), "upstream_aborted"),
        (_errored("Client disconnected."), "client_disconnected"),
        (_errored("killed"), "gateway_error"),
        (_failed(FailedClosed.CUT), "gateway_error"),
        # The client left after the gateway's error event ended the stream: the first cause.
        (_failed(FailedClosed.CUT, "Client disconnected."), "gateway_error"),
        (_streamed(complete=True, model_mismatch=True), "model_mismatch"),
        (_streamed(complete=True, e2ee_failed=True), "e2ee_failed"),
        (_streamed(complete=True, opaque=True), "unreadable"),
        (_streamed(complete=False), "upstream_aborted"),
        (_failed(FailedClosed.WITHHELD), None),  # replaced before its headers (and id) left
        (tflow.tflow(resp=True), None),  # a plain answer: its headers left with its body
    ],
)
def test_why_a_promised_stream_is_incomplete(flow: http.HTTPFlow, reason: str | None) -> None:
    assert _cut_reason(flow) == reason


async def test_a_promise_left_open_is_released_and_its_waiters_go_at_once() -> None:
    book = ReceiptBook(_Link())  # type: ignore[arg-type]
    book.promise("rcpt_lost", 7)
    waiter = asyncio.create_task(book.get("rcpt_lost", 7, 3600))
    await asyncio.sleep(0)
    assert book.promised("rcpt_lost") and not waiter.done()
    flow = tflow.tflow(resp=True)
    flowstate.set_receipt_id(flow, "rcpt_lost")
    counted: list[tuple[str, ...]] = []
    receipts = SimpleNamespace(book=book, _count=lambda *a: counted.append(a))
    Receipts.release(receipts, flow)  # type: ignore[arg-type]
    assert not book.promised("rcpt_lost")  # nothing left to wait for: a GET answers 404 now
    assert await waiter is None
    assert counted == [("lost", "issuer_fault")]


def test_a_promise_whose_answer_was_withheld_is_released_as_withdrawn() -> None:
    """The issuer raised on a plain answer: the guard withheld it, and the envelope that replaced
    it carries no receipt id, so the client never saw one."""
    book = ReceiptBook(_Link())  # type: ignore[arg-type]
    book.promise("rcpt_w", 7)
    flow = _failed(FailedClosed.WITHHELD)
    flowstate.set_receipt_id(flow, "rcpt_w")
    counted: list[tuple[str, ...]] = []
    receipts = SimpleNamespace(book=book, _count=lambda *a: counted.append(a))
    Receipts.release(receipts, flow)  # type: ignore[arg-type]
    assert not book.promised("rcpt_w")
    assert counted == [("withdrawn", "issuer_fault")]


async def test_release_settles_even_when_what_follows_it_raises(monkeypatch) -> None:
    book = ReceiptBook(_Link())  # type: ignore[arg-type]
    book.promise("rcpt_x", 7)
    flow = tflow.tflow(resp=True)
    flowstate.set_receipt_id(flow, "rcpt_x")

    def broken(*_: Any) -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr(flowstate, "request_id", broken)  # the log line's request id
    Receipts.release(SimpleNamespace(book=book, _count=broken), flow)  # type: ignore[arg-type]
    assert not book.promised("rcpt_x")


async def test_a_promise_no_flow_end_settled_expires() -> None:
    """Neither the issuer nor the release ran: the book settles the promise once it is older
    than any chat lasts, so the table cannot leak and a GET no longer waits for it."""
    now = [1000.0]
    book = ReceiptBook(_Link(), clock=lambda: now[0])  # type: ignore[arg-type]
    book.promise("rcpt_old", 7)
    waiter = asyncio.create_task(book.get("rcpt_old", 7, 3600))
    await asyncio.sleep(0)
    now[0] += PROMISE_MAX_AGE_S - 1
    book.promise("rcpt_new", 7)
    assert book.promised("rcpt_old") and not waiter.done()  # not yet that old
    now[0] += 1
    book.promise("rcpt_newer", 7)
    assert not book.promised("rcpt_old") and book.promised("rcpt_new")
    assert await waiter is None
    now[0] += PROMISE_MAX_AGE_S
    assert await book.get("rcpt_new", 7, 3600) is None  # expired as it was asked for: no wait
    assert not book.promised("rcpt_new") and not book.promised("rcpt_newer")


def test_open_promises_are_bounded_in_number() -> None:
    book = ReceiptBook(_Link(), max_promises=3)  # type: ignore[arg-type]
    for n in range(5):
        book.promise(f"rcpt_{n}", 7)
    assert [book.promised(f"rcpt_{n}") for n in range(5)] == [False, False, True, True, True]
