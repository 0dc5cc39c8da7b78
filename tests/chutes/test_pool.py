"""The instance pool, driven by a fake Chutes API and a manual clock (no sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from teegate.catalog.attestation.chutes import DiscoveredInstance, Discovery
from teegate.catalog.attestation.source import EvidenceFetchError
from teegate.catalog.attestation.verdict import InstanceVerdict, Verdict
from teegate.catalog.chutes.pool import (
    InstancePool,
    NoAttestedInstance,
    PoolSettings,
    TokensExhausted,
)

CHUTE = "c0ffee00-0000-5000-8000-000000000001"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Concurrent sleepers share one timeline: time only moves forward to each target."""
        target = self.now + seconds
        await asyncio.sleep(0)
        self.now = max(self.now, target)


class FakeChutes:
    """``/e2e/instances`` and evidence as the test sets them; counts every call."""

    def __init__(self, instances: dict[str, str], tokens: int = 3, ttl: int = 60) -> None:
        self.instances_by_id = dict(instances)  # instance id -> key
        self.tokens = tokens
        self.ttl = ttl
        self.good_keys: set[str] = set(instances.values())  # keys a quote would bind
        self.discoveries = 0
        self.discovered_at: list[float] = []
        self.evidence_calls = 0
        self.fail_discovery = False
        self.hold: asyncio.Event | None = None  # set: evidence answers only once it is set
        self.asked = asyncio.Event()  # set when a held evidence request has arrived
        self._serial = 0

    async def instances(self, chute_id: str) -> Discovery:
        assert chute_id == CHUTE
        self.discoveries += 1
        self.discovered_at.append(self.clock())
        if self.fail_discovery:
            raise EvidenceFetchError("instance discovery answered HTTP 429")
        rows = []
        for iid, key in self.instances_by_id.items():
            nonces = []
            for _ in range(self.tokens):
                self._serial += 1
                nonces.append(f"{iid}-n{self._serial}")
            rows.append(DiscoveredInstance(iid, key, tuple(nonces)))
        return Discovery(tuple(rows), self.ttl)

    async def evidence(self, chute_id: str, nonce_hex: str) -> dict[str, Any]:
        self.evidence_calls += 1
        if self.hold is not None:
            self.asked.set()
            await self.hold.wait()
        return {"nonce": nonce_hex}

    async def verify(
        self, model: str, keys: Mapping[str, str], doc: dict[str, Any], nonce_hex: str
    ) -> list[InstanceVerdict]:
        assert doc["nonce"] == nonce_hex and len(nonce_hex) == 64
        now = int(self.clock())
        return [
            InstanceVerdict(
                instance_id=iid,
                ok=key in self.good_keys,
                reason="attested" if key in self.good_keys else "attestation failed: unbound key",
                e2e_pubkey=key,
                verified_at=now,
                expires_at=now + (720 if key in self.good_keys else 60),
            )
            for iid, key in keys.items()
        ]


def _v(pool: InstancePool) -> Verdict:
    v = pool.verdict
    assert v is not None
    return v


def _pool(api: FakeChutes, clock: Clock, on_verdict: Any = None, **settings: Any) -> InstancePool:
    api.clock = clock  # type: ignore[attr-defined]
    return InstancePool(
        "m-TEE",
        CHUTE,
        on_verdict=on_verdict,
        fetcher=api,
        verifier=api.verify,
        clock=clock,
        sleep=clock.sleep,
        settings=PoolSettings(**{"low_water": 2, **settings}),
    )


async def test_first_acquire_discovers_verifies_and_spreads_round_robin() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA", "b": "KB"})
    pool = _pool(api, clock)
    tickets = [await pool.acquire() for _ in range(4)]
    assert [t.instance_id for t in tickets] == ["a", "b", "a", "b"]
    assert {t.e2e_pubkey for t in tickets} == {"KA", "KB"}
    assert len({t.nonce for t in tickets}) == 4
    assert api.discoveries == 1 and api.evidence_calls == 1
    v = _v(pool)
    assert v.ok and v.evidence_kind == "chutes" and len(v.instances) == 2


async def test_unverified_instance_is_never_used() -> None:
    clock, api = Clock(), FakeChutes({"good": "KG", "rogue": "KR"})
    api.good_keys = {"KG"}
    pool = _pool(api, clock)
    for _ in range(3):
        assert (await pool.acquire()).instance_id == "good"
    by_id = {i.instance_id: i for i in _v(pool).instances}
    assert by_id["good"].ok and not by_id["rogue"].ok


async def test_no_verified_instance_refuses() -> None:
    clock, api = Clock(), FakeChutes({"x": "KX"})
    api.good_keys = set()
    pool = _pool(api, clock)
    with pytest.raises(NoAttestedInstance) as e:
        await pool.acquire()
    assert e.value.code == "no_attested_instance" and "unbound key" in str(e.value)
    assert not _v(pool).ok


async def test_discovery_failure_refuses_and_is_reported() -> None:
    clock, api = Clock(), FakeChutes({"x": "KX"})
    api.fail_discovery = True
    pool = _pool(api, clock)
    with pytest.raises(NoAttestedInstance):
        await pool.acquire()
    assert "HTTP 429" in _v(pool).reason


async def test_refill_below_low_water_and_rate_bound() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"}, tokens=3)
    pool = _pool(api, clock, discovery_interval_s=6.0)
    await pool.acquire()
    await pool.acquire()  # 1 left < low water 2: a background refill is requested...
    await pool.refill()  # ...but inside the discovery interval nothing is fetched
    assert api.discoveries == 1
    clock.now += 6
    await pool.refill()
    assert api.discoveries == 2 and pool.available() == 4


async def test_expired_tokens_are_dropped() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"}, tokens=2, ttl=60)
    pool = _pool(api, clock, token_margin_s=5.0)
    first = await pool.acquire()
    assert first.expires_at == 1_060
    clock.now += 55  # the remaining token is within the margin of its expiry
    assert pool.available() == 0
    t = await pool.acquire()  # a fresh discovery, not the stale token
    assert t.expires_at == clock.now + 60 and api.discoveries == 2


async def test_exhaustion_waits_one_interval_then_gives_up() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"}, tokens=1)
    pool = _pool(api, clock, discovery_interval_s=6.0, max_wait_s=6.0)
    await pool.acquire()
    api.tokens = 0  # the upstream hands out no more tokens
    start = clock.now
    with pytest.raises(TokensExhausted) as e:
        await pool.acquire()
    assert isinstance(e.value, NoAttestedInstance)
    assert clock.now - start <= 6.0
    assert api.discoveries <= 2 + 1  # never more than one call per interval


async def test_rotated_key_is_unusable_until_verified_again() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA", "b": "KB"})
    pool = _pool(api, clock)
    await pool.acquire()
    api.instances_by_id["a"] = "KA2"  # instance a restarted with a new key
    api.good_keys = {"KB"}  # ... which its evidence does not (yet) bind
    clock.now += 10
    await pool.refill()
    assert all(t.instance_id == "b" for t in [await pool.acquire() for _ in range(3)])
    assert any(i.instance_id == "a" and not i.ok for i in _v(pool).instances)
    api.good_keys.add("KA2")  # the new key verifies once the refusal's retry time is up
    clock.now += 61
    await pool.refill()
    tickets = [await pool.acquire() for _ in range(4)]
    assert {t.e2e_pubkey for t in tickets if t.instance_id == "a"} == {"KA2"}


async def test_key_change_without_new_evidence_never_pairs_old_verdict_with_new_key() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"})
    pool = _pool(api, clock, evidence_interval_s=1_000.0)
    await pool.acquire()
    api.instances_by_id["a"] = "KA2"
    api.good_keys = {"KA", "KA2"}
    clock.now += 10
    await pool.refill()  # discovery sees the new key; evidence may not be fetched yet
    with pytest.raises(NoAttestedInstance):
        await pool.acquire()
    assert "key changed" in _v(pool).instances[0].reason


@pytest.mark.parametrize("sent", [False, True])
async def test_failed_instance_is_withdrawn(sent: bool) -> None:
    clock, api = Clock(), FakeChutes({"a": "KA", "b": "KB"})
    pool = _pool(api, clock)
    t = await pool.acquire()
    assert pool.failed(t, sent=sent) is (not sent)
    others = {(await pool.acquire()).instance_id for _ in range(2)}
    assert others == {"a", "b"} - {t.instance_id}
    await pool.aclose()


async def test_evidence_fetched_before_a_withdrawal_does_not_reinstate_the_instance() -> None:
    """An instance that fails while a re-verification is in flight stays withdrawn: that
    evidence was asked for before the failure, so it cannot vouch for the instance after it."""
    clock, api = Clock(), FakeChutes({"a": "KA", "b": "KB"})
    pool = _pool(api, clock, evidence_interval_s=100.0, reverify_interval_s=100.0)
    t = await pool.acquire()
    clock.now += 100  # re-verification due
    api.hold = asyncio.Event()
    refill = asyncio.create_task(pool.refill())
    await api.asked.wait()  # the re-verification's evidence request is out
    pool.failed(t, sent=True)  # e.g. its answer did not decrypt under our key
    api.hold.set()
    await refill
    clock.now += 10  # a discovery brings the instance new tokens; no evidence is due yet
    await pool.refill()
    assert api.evidence_calls == 2
    assert {(await pool.acquire()).instance_id for _ in range(4)} == {"a", "b"} - {t.instance_id}
    clock.now += 100  # evidence asked for after the withdrawal verifies it again
    await pool.refill()
    assert t.instance_id in {(await pool.acquire()).instance_id for _ in range(4)}
    await pool.aclose()


async def test_token_refusal_keeps_the_instance() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"})
    pool = _pool(api, clock)
    t = await pool.acquire()
    assert pool.failed(t, sent=False, kind="token")
    assert (await pool.acquire()).instance_id == "a"
    await pool.aclose()


async def test_reverification_is_scheduled() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"})
    pool = _pool(api, clock, reverify_interval_s=100.0)
    await pool.acquire()
    clock.now += 101
    await pool.refill()
    assert api.evidence_calls == 2


async def test_concurrent_demand_respects_the_discovery_rate() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA", "b": "KB"}, tokens=1)
    pool = _pool(api, clock, discovery_interval_s=6.0, max_wait_s=30.0)
    tickets = await asyncio.gather(*(pool.acquire() for _ in range(8)))
    assert len({t.nonce for t in tickets}) == 8
    gaps = [b - a for a, b in zip(api.discovered_at, api.discovered_at[1:], strict=False)]
    assert api.discoveries == 4 and all(g >= 6.0 for g in gaps), api.discovered_at


async def test_pending_until_tried_then_verdicts_are_announced_on_change() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"})
    seen: list[Verdict] = []
    pool = _pool(api, clock, on_verdict=seen.append)
    assert pool.verdict is None  # pending: nothing tried yet
    await pool.maintain_once()
    assert [v.ok for v in seen] == [True] and seen[0].instances[0].instance_id == "a"
    await pool.maintain_once()  # nothing due, nothing new to announce
    assert len(seen) == 1 and api.discoveries == 1


async def test_idle_pool_does_not_spend_discovery_budget() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"}, tokens=1)
    pool = _pool(api, clock, reverify_interval_s=600.0)
    await pool.maintain_once()
    for _ in range(20):  # two idle minutes of upkeep, tokens long expired
        clock.now += 6
        await pool.maintain_once()
    assert api.discoveries == 1
    await pool.acquire()  # demand: the pool now keeps tokens ahead
    clock.now += 6
    await pool.maintain_once()
    assert api.discoveries == 3


async def test_start_and_stop() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"})
    seen: list[Verdict] = []
    announced = asyncio.Event()

    def note(v: Verdict) -> None:
        seen.append(v)
        announced.set()

    pool = _pool(api, clock, on_verdict=note)
    await pool.start()
    await asyncio.wait_for(announced.wait(), 5)
    await pool.stop()
    assert seen[0].ok


async def test_a_verifier_surprise_refuses_instead_of_crashing() -> None:
    clock, api = Clock(), FakeChutes({"a": "KA"})
    api.clock = clock  # type: ignore[attr-defined]

    async def broken(*_args: Any) -> list[InstanceVerdict]:
        raise KeyError("surprise")

    pool = InstancePool(
        "m-TEE", CHUTE, fetcher=api, verifier=broken, clock=clock, sleep=clock.sleep
    )
    with pytest.raises(NoAttestedInstance, match="internal error: KeyError"):
        await pool.acquire()
