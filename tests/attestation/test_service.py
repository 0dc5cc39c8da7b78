"""AttestationService: cached verdicts, schedule, refusals, key changes, concurrency, flag mode.

Evidence comes from the sandbox's own minter (in process); a clock object stands in for wall
time so schedules can be crossed without waiting.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from teegate.catalog.attestation import (
    AttestationService,
    CollateralCache,
    EvidenceFetchError,
    EvidenceSource,
    Policy,
    load_collateral,
    parse_near_ai,
)
from teegate.sandbox.dcap_pki import DcapTestPki
from teegate.sandbox.evidence import EvidenceMinter
from tests.support.gpu_vectors import trusting_sandbox_gpus
from tests.support.tdx_vectors import NOW

A, B = "org/model-a-TEE", "org/model-b-TEE"


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


class MinterSource:
    """NEAR AI-format evidence from the sandbox minter, with knobs to fail or hold fetches."""

    name = "minter"

    def __init__(self, minter: EvidenceMinter) -> None:
        self.minter = minter
        self.fetches: Counter[str] = Counter()
        self.down: set[str] = set()
        self.hold: asyncio.Event | None = None
        self.active = 0
        self.peak = 0

    async def fetch(self, model: str, nonce: bytes) -> dict[str, Any]:
        self.fetches[model] += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.hold is not None:
                await self.hold.wait()
            if model in self.down:
                raise EvidenceFetchError("upstream down")
            return self.minter.report(model, nonce)
        finally:
            self.active -= 1

    def parse(self, evidence: dict[str, Any]) -> list:
        return parse_near_ai(evidence)


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll the event loop until ``predicate`` holds (the service works in the background)."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def source(pki: DcapTestPki, clock: Clock) -> MinterSource:
    return MinterSource(EvidenceMinter(pki, clock=clock))


@pytest.fixture
def policy(root_der_file: Path) -> Policy:
    return trusting_sandbox_gpus(Policy(test_root_ca=root_der_file))


@pytest.fixture
async def service(
    source: MinterSource, policy: Policy, clock: Clock
) -> AsyncIterator[AttestationService]:
    svc = AttestationService(source, policy, clock=clock)
    await svc.start()
    yield svc
    await svc.stop()


def test_minter_source_satisfies_the_protocol(source: MinterSource) -> None:
    assert isinstance(source, EvidenceSource)


async def test_new_models_are_attested_in_the_background(
    service: AttestationService, source: MinterSource
) -> None:
    service.set_models([A, B])
    assert service.refusal(A) == "attestation pending: not yet attested"
    await until(lambda: service.verdict(A) is not None and service.verdict(B) is not None)
    verdict = service.verdict(A)
    assert verdict is not None and verdict.ok, verdict
    assert verdict.mode == "dcap" and verdict.root == "test"
    assert verdict.signing_address == source.minter.process_key.address_hex
    assert service.refusal(A) is None
    assert service.refusal("org/unknown") == "attestation failed: model is not attested"
    assert source.fetches == Counter({A: 1, B: 1})


async def test_reattests_on_schedule(
    service: AttestationService, source: MinterSource, clock: Clock, policy: Policy
) -> None:
    service.set_models([A])
    await until(lambda: service.verdict(A) is not None)
    first = service.verdict(A)
    clock.now += policy.reattest_interval_s - 1
    service.kick()
    await asyncio.sleep(0.05)  # give a (wrong) early re-attestation the chance to happen
    assert source.fetches[A] == 1
    clock.now += 2
    service.kick()
    await until(lambda: source.fetches[A] == 2 and service.verdict(A) is not first)
    second = service.verdict(A)
    assert second.ok and second.verified_at == int(clock.now)
    assert second.nonce != first.nonce  # a fresh nonce every time


async def test_an_unrefreshed_verdict_expires(
    service: AttestationService, source: MinterSource, clock: Clock
) -> None:
    service.set_models([A])
    await until(lambda: service.verdict(A) is not None)
    await service.stop()  # no more re-attestation
    verdict = service.verdict(A)
    clock.now = verdict.expires_at - 1
    assert service.refusal(A) is None
    clock.now = verdict.expires_at
    assert service.refusal(A).startswith("attestation expired at ")


async def test_failure_refuses_and_is_retried(
    service: AttestationService, source: MinterSource, clock: Clock, policy: Policy
) -> None:
    source.down.add(A)
    service.set_models([A])
    await until(lambda: service.verdict(A) is not None)
    assert service.refusal(A) == "attestation failed: evidence unavailable: upstream down"
    source.down.clear()
    clock.now += policy.retry_interval_s
    service.kick()
    await until(lambda: service.verdict(A).ok)
    assert source.fetches[A] == 2


async def test_a_failed_reattestation_withdraws_a_good_verdict(
    service: AttestationService, source: MinterSource, clock: Clock, policy: Policy
) -> None:
    service.set_models([A])
    await until(lambda: service.verdict(A) is not None)
    assert service.refusal(A) is None
    source.minter.set_mode(A, "stale")
    clock.now += policy.reattest_interval_s
    service.kick()
    await until(lambda: not service.verdict(A).ok)
    assert service.refusal(A).startswith("attestation failed: collateral expired at ")


async def test_gone_models_are_dropped(service: AttestationService) -> None:
    service.set_models([A, B])
    await until(lambda: service.verdict(A) is not None and service.verdict(B) is not None)
    service.set_models([B])
    assert service.verdict(A) is None
    assert service.refusal(A) == "attestation failed: model is not attested"
    assert service.refusal(B) is None


async def test_a_changed_signing_key_withdraws_the_verdict_and_reattests(
    service: AttestationService, source: MinterSource
) -> None:
    service.set_models([A])
    await until(lambda: service.verdict(A) is not None)
    old = service.verdict(A).signing_address
    service.note_signing_key(A, old.upper().replace("0X", "0x"))  # same key, any case
    assert service.refusal(A) is None
    source.minter.set_mode(A, "rotate_key")
    new = source.minter.key_for(A).address_hex
    service.note_signing_key(A, new)
    assert service.refusal(A) == "attestation failed: upstream signing key changed, re-attesting"
    await until(lambda: service.verdict(A).ok)
    assert service.verdict(A).signing_address == new
    assert source.fetches[A] == 2


async def test_concurrency_is_capped(
    source: MinterSource, root_der_file: Path, clock: Clock
) -> None:
    source.hold = asyncio.Event()
    capped = trusting_sandbox_gpus(Policy(test_root_ca=root_der_file, max_concurrency=2))
    svc = AttestationService(source, capped, clock=clock)
    await svc.start()
    try:
        models = [f"org/m{i}-TEE" for i in range(6)]
        svc.set_models(models)
        await until(lambda: source.active == 2)
        for _ in range(20):
            await asyncio.sleep(0)
        assert source.active == 2
        source.hold.set()
        await until(lambda: all(svc.verdict(m) is not None for m in models))
        assert source.peak == 2
        assert all(svc.verdict(m).ok for m in models)
    finally:
        await svc.stop()


async def test_attest_now_with_a_client_nonce_leaves_the_cache_alone(
    service: AttestationService,
) -> None:
    service.set_models([A])
    await until(lambda: service.verdict(A) is not None)
    cached = service.verdict(A)
    nonce = os.urandom(32)
    verdict = await service.attest_now(A, nonce)
    assert verdict.ok and verdict.nonce == nonce.hex()
    assert verdict.evidence["request_nonce"] == nonce.hex()
    assert service.verdict(A) is cached
    own = await service.attest_now(A)
    assert service.verdict(A) is own and own.nonce != cached.nonce


async def test_flag_mode_claims_no_hardware_verification(
    source: MinterSource, clock: Clock
) -> None:
    svc = AttestationService(source, Policy(mode="flag"), clock=clock)
    await svc.start()
    try:
        svc.set_models([A])
        verdict = svc.verdict(A)
        assert verdict is not None and verdict.ok and verdict.mode == "flag"
        assert "no hardware attestation was verified" in verdict.reason
        assert verdict.tee_type is None and verdict.tcb_status is None and verdict.checks == {}
        assert svc.refusal(A) is None
        await asyncio.sleep(0.05)
        assert source.fetches[A] == 0  # nothing is attested in the background
        on_demand = await svc.attest_now(A, os.urandom(32))
        assert on_demand.mode == "flag" and on_demand.root is None
        assert on_demand.evidence.get("intel_quote")  # handed over, unverified
    finally:
        await svc.stop()


async def test_shipped_collateral_is_ignored_without_the_test_root(
    source: MinterSource, pki: DcapTestPki, clock: Clock
) -> None:
    """Real deployments fetch collateral from PCCS: what the upstream ships is not used."""
    fetched: list[bytes] = []

    async def pccs(url: str, quote: bytes):
        fetched.append(quote)
        return load_collateral(pki.collateral(issue=NOW - 86400, next_update=NOW + 86400))

    cache = CollateralCache("https://pccs.invalid", fetch=pccs)
    svc = AttestationService(source, Policy(), collateral=cache, clock=clock)
    verdict = await svc.attest_now(A, os.urandom(32))
    assert len(fetched) == 1
    assert not verdict.ok and verdict.root == "intel"
    assert verdict.checks["quote_verified"] is False  # the test PKI does not chain to Intel
