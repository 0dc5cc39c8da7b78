"""The background signature checker against an in-process upstream: outcomes, what withdraws a
model, and its bounded queue."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from teegate.addons import signatures
from teegate.addons.signatures import SignatureChecker, SignatureJob, SignatureResult
from teegate.catalog.attestation.signature import sha256_hex
from teegate.sandbox.evidence import SigningKey
from teegate.sandbox.signatures import eip191_sign

KEY = SigningKey.generate()
REQ, RESP = sha256_hex(b"req"), sha256_hex(b"resp")
Handler = Callable[[web.Request], web.Response]


def _job(cid: str = "chatcmpl-1") -> SignatureJob:
    return SignatureJob(
        request_id="r1", model="m", upstream_model="m", completion_id=cid,
        request_sha256=REQ, response_sha256=RESP, attested=(KEY.address_hex,),
        receipt_id="rcpt_1", reservation_id=1,
    )  # fmt: skip


class Upstream:
    """An aiohttp app answering whatever ``handler`` says, recording each request."""

    def __init__(self) -> None:
        self.handler: Handler = lambda r: web.Response(status=404)
        self.seen: list[web.Request] = []
        self.origin = ""

    async def _serve(self, request: web.Request) -> web.Response:
        self.seen.append(request)
        return self.handler(request)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up._serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    up.origin = f"http://127.0.0.1:{port}"
    yield up
    await runner.cleanup()


class Harness:
    def __init__(
        self, origin: str, queue_size: int = 10, clock: Callable[[], float] | None = None
    ) -> None:
        self.withdrawn: list[tuple[str, str, bool]] = []
        self.results: list[SignatureResult] = []

        def withdraw(model: str, why: str, reattest_now: bool = False) -> None:
            self.withdrawn.append((model, why, reattest_now))

        self.checker = SignatureChecker(
            origin=origin,
            api_key=lambda: "up-key",
            withdraw=withdraw,
            on_result=lambda job, result: self.results.append(result),
            queue_size=queue_size,
            workers=1,
            timeout_s=5,
            max_lag_s=2.0,
            **({"clock": clock} if clock is not None else {}),
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


def _signed(text: str, key: SigningKey = KEY) -> Handler:
    doc = {"text": text, "signature": eip191_sign(key, text), "signing_address": key.address_hex}
    return lambda r: web.json_response({**doc, "signing_algo": "ecdsa"})


async def test_verified_signature_withdraws_nothing(upstream: Upstream) -> None:
    upstream.handler = _signed(f"{REQ}:{RESP}")
    h = Harness(upstream.origin)
    result = await h.run(_job("chatcmpl/../x?y=1"))
    assert result.status == "verified" and h.withdrawn == []
    [req] = upstream.seen
    # The id stays one path segment and adds no parameter.
    assert req.raw_path == "/v1/signature/chatcmpl%2F..%2Fx%3Fy%3D1?model=m&signing_algo=ecdsa"
    assert req.headers["authorization"] == "Bearer up-key"


@pytest.mark.parametrize(
    ("handler", "status"),
    [
        (lambda r: web.Response(status=404), "missing"),
        (lambda r: web.Response(body=b"not json"), "failed"),
        (lambda r: web.Response(body=b"x" * (signatures.MAX_SIGNATURE_BYTES + 1)), "missing"),
        (_signed(f"{REQ}:{RESP}", SigningKey.generate()), "failed"),
        (_signed(f"{RESP}:{REQ}"), "failed"),
    ],
    ids=["404", "not-json", "too-large", "other-key", "other-hashes"],
)
async def test_failures_withdraw_the_model(upstream: Upstream, handler: Any, status: str) -> None:
    upstream.handler = handler
    h = Harness(upstream.origin)
    result = await h.run(_job())
    assert result.status == status
    [(model, why, reattest_now)] = h.withdrawn
    assert model == "m" and why.startswith(f"response signature {status}")
    assert reattest_now is False


async def test_unreachable_upstream_reattests_at_once(upstream: Upstream) -> None:
    h = Harness("http://127.0.0.1:9")  # discard: nothing listens
    result = await h.run(_job())
    assert result.status == "missing" and result.unreachable
    assert h.withdrawn[0][2] is True


async def test_a_full_queue_is_unchecked_not_a_failure() -> None:
    h = Harness("http://127.0.0.1:9", queue_size=1)
    assert h.checker.submit(_job())  # not started: stays queued
    assert not h.checker.submit(_job())
    assert h.withdrawn == []


async def test_a_check_that_waited_too_long_is_unchecked_not_fetched(upstream: Upstream) -> None:
    """The upstream keeps only its last ~1000 signatures: a check the gateway's own queue held
    past max_lag_s is skipped ("unchecked"), never fetched and blamed on the upstream."""
    upstream.handler = lambda r: web.Response(status=404)  # what a late fetch would find
    now = [100.0]
    h = Harness(upstream.origin, clock=lambda: now[0])
    assert h.checker.submit(_job())  # not started: it waits in the queue
    now[0] += 2.5
    h.checker.start()
    try:
        await h.checker.drain()
    finally:
        await h.checker.stop()
    [result] = h.results
    assert result.status == "unchecked" and "lagged 2.5 s" in result.reason
    assert upstream.seen == [] and h.withdrawn == []
    # Within the bound it is fetched, and a missing signature still withdraws the model.
    h2 = Harness(upstream.origin, clock=lambda: now[0])
    assert (await h2.run(_job())).status == "missing" and len(upstream.seen) == 3
    assert h2.withdrawn
