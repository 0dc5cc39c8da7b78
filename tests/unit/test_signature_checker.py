"""The background signature checker: outcomes, what withdraws a model, and its bounded queue."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from teegate.addons import signatures
from teegate.addons.signatures import SignatureChecker, SignatureJob, SignatureResult
from teegate.catalog.attestation.signature import sha256_hex
from teegate.sandbox.evidence import SigningKey
from teegate.sandbox.signatures import eip191_sign

KEY = SigningKey.generate()
REQ, RESP = sha256_hex(b"req"), sha256_hex(b"resp")


def _job(cid: str = "chatcmpl-1") -> SignatureJob:
    return SignatureJob(
        request_id="r1", model="m", upstream_model="m", completion_id=cid,
        request_sha256=REQ, response_sha256=RESP, attested=(KEY.address_hex,),
        receipt_id="rcpt_1", reservation_id=1,
    )  # fmt: skip


class Harness:
    def __init__(self, handler: Any, queue_size: int = 10) -> None:
        self.withdrawn: list[tuple[str, str, bool]] = []
        self.results: list[SignatureResult] = []
        self.seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            self.seen.append(request)
            return handler(request)

        self.checker = SignatureChecker(
            origin="http://upstream.test",
            api_key=lambda: "up-key",
            withdraw=lambda m, why, reattest_now=False: self.withdrawn.append(
                (m, why, reattest_now)
            ),
            on_result=lambda job, result: self.results.append(result),
            queue_size=queue_size,
            workers=1,
            timeout_s=5,
            transport=httpx.MockTransport(record),
        )

    async def run(self, job: SignatureJob) -> SignatureResult:
        self.checker.start()
        try:
            assert self.checker.submit(job)
            await self.checker.drain()
        finally:
            await self.checker.stop()
        [result] = self.results
        return result


@pytest.fixture(autouse=True)
def no_retry_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signatures, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))


def _signed(text: str, key: SigningKey = KEY) -> httpx.Response:
    doc = {"text": text, "signature": eip191_sign(key, text), "signing_address": key.address_hex}
    return httpx.Response(200, json={**doc, "signing_algo": "ecdsa"})


async def test_verified_signature_withdraws_nothing() -> None:
    h = Harness(lambda r: _signed(f"{REQ}:{RESP}"))
    result = await h.run(_job("chatcmpl/../x"))
    assert result.status == "verified" and h.withdrawn == []
    [req] = h.seen
    path = req.url.raw_path.split(b"?")[0]
    assert path == b"/v1/signature/chatcmpl%2F..%2Fx"  # the id cannot walk the path
    assert dict(req.url.params) == {"model": "m", "signing_algo": "ecdsa"}
    assert req.headers["authorization"] == "Bearer up-key"


@pytest.mark.parametrize(
    ("handler", "status", "now"),
    [
        (lambda r: httpx.Response(404), "missing", False),
        (lambda r: httpx.Response(200, content=b"not json"), "failed", False),
        (lambda r: _signed(f"{REQ}:{RESP}", SigningKey.generate()), "failed", False),
        (lambda r: _signed(f"{RESP}:{REQ}"), "failed", False),
    ],
    ids=["404", "not-json", "other-key", "other-hashes"],
)
async def test_failures_withdraw_the_model(handler: Any, status: str, now: bool) -> None:
    h = Harness(handler)
    result = await h.run(_job())
    assert result.status == status
    [(model, why, reattest_now)] = h.withdrawn
    assert model == "m" and why.startswith(f"response signature {status}") and reattest_now is now


async def test_unreachable_upstream_reattests_at_once() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    h = Harness(down)
    result = await h.run(_job())
    assert result.status == "missing" and result.unreachable
    assert h.withdrawn[0][2] is True and len(h.seen) == 3  # tried three times


async def test_a_full_queue_is_unchecked_not_a_failure() -> None:
    h = Harness(lambda r: httpx.Response(404), queue_size=1)
    assert h.checker.submit(_job())  # not started: stays queued
    assert not h.checker.submit(_job())
    assert h.withdrawn == []
