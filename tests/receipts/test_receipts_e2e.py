"""Receipts and response signatures end to end: sandbox (signing with its attested key) ->
gateway (dcap, the sandbox's test root) -> the openai SDK, as real processes shared by the module.

Failed signatures refuse a model until it re-attests after ``attestation.retry_interval_s``
(60 s here, so the refusal stays observable); the test that provokes one uses a model no other
test here touches.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from teegate.catalog.attestation.receipts import ReceiptError, canonical, verify_receipt
from teegate.cli import main
from tests.support.accounts import create_key
from tests.support.gateway_proc import GatewayProc, start_gateway
from tests.support.metrics import counted
from tests.support.reattest import MSG, refusal
from tests.support.sandbox_proc import SandboxProc
from tests.support.wait import until

MODEL = "deepseek-ai/DeepSeek-V3.2-TEE"
FORGED = "Qwen/Qwen3-32B-TEE"  # signed by a rogue key in the last test; nothing else uses it


@pytest.fixture(scope="module")
def gateway(upstream: SandboxProc) -> Iterator[GatewayProc]:
    extra = "catalog.refresh_interval_s = 1\nattestation.retry_interval_s = 60\n"
    with start_gateway(upstream.base_url, extra_toml=extra) as gw:
        yield gw


@pytest.fixture(scope="module")
def other_key(gateway: GatewayProc) -> str:
    """A second key of the same account: receipts belong to the key, not the account."""
    return create_key(gateway.db, "test")


def _receipt(http: httpx.Client, receipt_id: str, key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return http.get(f"/v1/receipts/{receipt_id}", headers=headers)


def _checked(http: httpx.Client, receipt_id: str) -> dict[str, Any]:
    """The receipt once the upstream's signature has been checked (revision 2)."""

    def done() -> dict[str, Any] | None:
        doc = _receipt(http, receipt_id).json()
        return doc if doc["receipt"]["upstream_signature"]["status"] != "pending" else None

    return until(done, "the signature check")


def _chat(client: openai.OpenAI, model: str, stream: bool) -> tuple[str, bytes]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MSG, stream=stream
    )
    if stream:
        body = b"".join(raw.http_response.iter_bytes())
    else:
        body = raw.http_response.content
    return raw.headers["x-teegate-receipt"], body


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_receipt_header_owner_only_and_hashes(http, client, upstream, other_key, stream):
    seen = upstream.requests_seen()
    receipt_id, body = _chat(client, MODEL, stream)
    assert receipt_id.startswith("rcpt_")
    doc = _checked(http, receipt_id)
    r = doc["receipt"]
    assert r["id"] == receipt_id and r["model"] == MODEL and r["stream"] is stream
    assert r["outcome"] == "complete" and "incomplete" not in r
    assert r["relayed_bytes"] == len(body)
    assert r["revision"] == 2 and r["upstream_signature"]["status"] == "verified"
    # Hashes of what actually crossed the wire, checked against the sandbox's own record.
    [sent] = [e for e in upstream.requests(since=seen) if e["path"] == "/v1/chat/completions"]
    assert r["request_sha256"] == hashlib.sha256(sent["body_text"].encode()).hexdigest()
    assert r["relayed_sha256"] == hashlib.sha256(body).hexdigest()
    if not stream:
        assert r["response_sha256"] == r["relayed_sha256"]
    else:  # the gateway asked for usage the client did not: what was relayed differs
        assert r["response_sha256"] != r["relayed_sha256"]
    text = r["upstream_signature"]["text"]
    assert text == f"{r['request_sha256']}:{r['response_sha256']}"
    rep = http.get("/v1/attestation/report", params={"model": MODEL}).json()
    assert r["verdict"]["signing_address"] == rep["verdict"]["signing_address"]
    assert r["upstream_signature"]["signing_address"] == rep["verdict"]["signing_address"]
    assert len(r["verdict"]["policy_sha256"]) == 64 and r["verdict"]["mode"] == "dcap"
    # Another key (even of the same account), and an unknown id: the same 404.
    for other in (_receipt(http, receipt_id, other_key), _receipt(http, "rcpt_" + "0" * 32)):
        assert other.status_code == 404
        assert other.json()["error"]["code"] == "receipt_not_found"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_responses_answer_is_described_as_relayed(http, client, gateway, stream):
    """``/v1/responses``: the upstream answered (and signed) a chat completion, the client got
    its Responses translation. ``response_sha256`` is the former (the signature covers it),
    ``relayed_sha256`` and the access log's ``bytes_out`` the latter."""
    raw = client.responses.with_raw_response.create(model=MODEL, input="Say hello", stream=stream)
    body = b"".join(raw.http_response.iter_bytes()) if stream else raw.http_response.content
    assert (b"response.completed" if stream else b'"object":"response"') in body
    r = _checked(http, raw.headers["x-teegate-receipt"])["receipt"]
    assert r["upstream_signature"]["status"] == "verified"
    assert r["upstream_signature"]["text"].endswith(":" + r["response_sha256"])
    assert r["relayed_sha256"] == hashlib.sha256(body).hexdigest() != r["response_sha256"]
    assert gateway.access_line(raw.headers["x-request-id"])["bytes_out"] == len(body)


def test_usage_row_records_the_signature(http, client, gateway):
    receipt_id, _ = _chat(client, MODEL, stream=False)
    request_id = _checked(http, receipt_id)["receipt"]["request_id"]

    def row() -> tuple[str, str] | None:
        with sqlite3.connect(gateway.db) as conn:
            found = conn.execute(
                "SELECT signature, (SELECT document FROM receipts WHERE id = ?) FROM usage "
                "WHERE request_id = ?",
                (receipt_id, request_id),
            ).fetchone()
        return found if found and found[0] == "verified" and found[1] else None

    status, stored = until(row, "the usage row's signature")
    assert json.loads(stored)["receipt"]["revision"] == 2


def test_receipt_verifies_offline_and_tampering_fails(http, client, upstream, gateway, tmp_path,
                                                      capsys):  # fmt: skip
    seen = upstream.requests_seen()
    receipt_id, body = _chat(client, MODEL, stream=False)
    doc = _checked(http, receipt_id)
    key = http.get("/v1/attestation/gateway").json()
    assert key["algorithm"] == "ed25519" and len(key["public_key"]) == 64
    assert key["quote"] is None  # not running in a TD here
    # The GPU part names the outcome and binds the full GPU report the attestation endpoint gives.
    gpu = doc["receipt"]["verdict"]["gpu"]
    report = http.get("/v1/attestation/report", params={"model": MODEL}).json()
    full = report["verdict"]["gpu"]
    assert gpu["ok"] is True and gpu["gpu_count"] == full["gpu_count"] >= 1
    assert gpu["report_sha256"] == hashlib.sha256(canonical(full)).hexdigest()
    assert "gpus" not in gpu
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(doc))
    assert main(["receipt", "verify", str(path), "--key", key["public_key"]]) == 0
    url = gateway.base_url
    args = ["receipt", "verify", str(path), "--gateway", url, "--api-key", gateway.api_key]
    assert main(args) == 0
    doc["receipt"]["upstream_signature"]["status"] = "failed"
    path.write_text(json.dumps(doc))
    assert main(["receipt", "verify", str(path), "--key", key["public_key"]]) == 1
    # The upstream's signature inside it verifies offline too, from the bytes themselves.
    [sent] = [e for e in upstream.requests(since=seen) if e["path"] == "/v1/chat/completions"]
    files = {"req": sent["body_text"].encode(), "resp": body}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    sig = doc["receipt"]["upstream_signature"]
    (tmp_path / "sig.json").write_text(json.dumps(sig))
    address = doc["receipt"]["verdict"]["signing_address"]
    base = ["attest", "signature", str(tmp_path / "req"), str(tmp_path / "resp")]
    assert main([*base, str(tmp_path / "sig.json"), "--address", address]) == 0
    assert main([*base, str(tmp_path / "sig.json"), "--address", "0x" + "11" * 20]) == 1
    capsys.readouterr()
    # Outcomes are counted (a verified one is not logged), never what was signed is logged;
    # the key file is the gateway's alone.
    metrics = httpx.get(gateway.urls["admin"] + "/metrics").text
    assert re.search(r'^teegate_response_signatures_total\{model="[^"]+",status="verified"\} [1-9]',
                     metrics, re.M), metrics
    complete = r'^teegate_receipts_total\{outcome="complete",reason=""\} [1-9]'
    assert re.search(complete, metrics, re.M), metrics
    logged = gateway.output_text()
    assert sig["text"] not in logged and sig["signature"] not in logged
    assert (gateway.workdir / "teegate-receipt-key.pem").stat().st_mode & 0o777 == 0o600


def test_signature_by_another_key_refuses_the_model(http, client, upstream):
    assert refusal(client, FORGED) is None
    httpx.post(f"{upstream.base_url}/_sandbox/signatures", json={FORGED: "wrong_key"},
               timeout=10).raise_for_status()  # fmt: skip
    try:
        receipt_id, _ = _chat(client, FORGED, stream=True)  # served: checked afterwards
        sig = _checked(http, receipt_id)["receipt"]["upstream_signature"]
        assert sig["status"] == "failed" and "does not vouch" in sig["reason"]
        refused = refusal(client, FORGED)
        assert refused is not None and refused["status"] == 400
        assert "response signature failed" in refused["message"]
        assert refusal(client, MODEL) is None  # other models are unaffected
    finally:
        httpx.post(f"{upstream.base_url}/_sandbox/signatures", json={FORGED: "valid"},
                   timeout=10).raise_for_status()  # fmt: skip


def test_a_stream_the_upstream_cut_gets_an_incomplete_receipt(http, gateway, upstream):
    """The id went out with the headers, so it resolves: a signed ``incomplete`` receipt that
    hashes exactly the bytes the client got, and claims no ``response_sha256``; it is counted."""
    cut = dict(outcome="incomplete", reason="upstream_aborted")
    before = counted(gateway, "teegate_receipts_total", **cut)
    upstream.behaviour(stop_after_chunks=3)
    got = bytearray()
    chat = {"model": MODEL, "messages": MSG, "stream": True}
    try:
        with http.stream("POST", "/v1/chat/completions", json=chat) as resp:
            assert resp.status_code == 200
            receipt_id = resp.headers["x-teegate-receipt"]
            with pytest.raises(httpx.HTTPError):
                for piece in resp.iter_bytes():
                    got += piece
    finally:
        upstream.behaviour(stop_after_chunks=None)
    assert got and b"[DONE]" not in got
    answer = _receipt(http, receipt_id)
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    key = http.get("/v1/attestation/gateway").json()["public_key"]
    r = verify_receipt(doc, key)
    assert r["id"] == receipt_id and r["revision"] == 1 and r["stream"] is True
    assert r["outcome"] == "incomplete" and r["incomplete"]["reason"] == "upstream_aborted"
    assert r["response_sha256"] is None  # never a hash the upstream's signature would cover
    assert r["relayed_sha256"] == hashlib.sha256(got).hexdigest()
    assert r["relayed_bytes"] == len(got)
    assert len(r["incomplete"]["received_sha256"]) == 64
    assert r["upstream_signature"] == {"status": "not_applicable"}  # no check was queued
    assert counted(gateway, "teegate_receipts_total", **cut) == before + 1
    doc["receipt"]["relayed_bytes"] += 1
    with pytest.raises(ReceiptError):
        verify_receipt(doc, key)


def test_a_stream_the_client_left_gets_an_incomplete_receipt(http, gateway, upstream):
    upstream.behaviour(hold_after_chunks=2)
    chat = {"model": MODEL, "messages": MSG, "stream": True}
    try:
        with httpx.Client(base_url=gateway.base_url, headers=http.headers, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=chat) as resp:
                receipt_id = resp.headers["x-teegate-receipt"]
                next(resp.iter_bytes())  # the first chunk arrived; then the client goes away
        upstream.release()
    finally:
        upstream.behaviour(hold_after_chunks=None)
    r = _receipt(http, receipt_id).json()["receipt"]
    assert (r["outcome"], r["incomplete"]["reason"]) == ("incomplete", "client_disconnected")
    assert r["response_sha256"] is None and r["relayed_bytes"] > 0
