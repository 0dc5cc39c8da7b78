"""Collateral caching until nextUpdate, and the [attestation] policy table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pydantic
import pytest

from teegate.catalog.attestation import (
    CollateralCache,
    Policy,
    collateral_window,
    load_collateral,
    load_policy,
)
from teegate.catalog.attestation.policy import INTEL_PCS_URL
from teegate.sandbox.dcap_pki import DcapTestPki, TdMeasurements
from tests.support.tdx_vectors import NOW

M = TdMeasurements(mrtd=bytes(48), rtmrs=(bytes(48),) * 4)


class Pccs:
    """Answers collateral like a PCCS would (the test PKI's), counting requests."""

    def __init__(self, pki: DcapTestPki, valid_for: int) -> None:
        self.pki = pki
        self.valid_for = valid_for
        self.calls = 0
        self.fail = False
        self.hold: asyncio.Event | None = None

    async def __call__(self, url: str, quote: bytes):
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            raise ValueError("PCCS unreachable")
        return load_collateral(
            self.pki.collateral(issue=NOW - 60, next_update=NOW + self.valid_for)
        )


async def test_cached_until_next_update(pki: DcapTestPki) -> None:
    pccs = Pccs(pki, valid_for=3600)
    cache = CollateralCache("https://pccs.test", fetch=pccs)
    quote = pki.td_quote(bytes(64), M)
    first = await cache.get(quote, NOW)
    assert collateral_window(first).next_update == NOW + 3600
    assert await cache.get(pki.td_quote(b"\x01" * 64, M), NOW + 3599) is first  # same platform
    assert pccs.calls == 1
    await cache.get(quote, NOW + 3600)
    assert pccs.calls == 2


async def test_platforms_do_not_share_entries(pki: DcapTestPki) -> None:
    pccs = Pccs(pki, valid_for=3600)
    cache = CollateralCache("https://pccs.test", fetch=pccs)
    await cache.get(pki.td_quote(bytes(64), M), NOW)
    await cache.get(DcapTestPki(seed=b"another platform").td_quote(bytes(64), M), NOW)
    assert pccs.calls == 2


async def test_concurrent_requests_share_one_fetch(pki: DcapTestPki) -> None:
    pccs = Pccs(pki, valid_for=3600)
    pccs.hold = asyncio.Event()
    cache = CollateralCache("https://pccs.test", fetch=pccs)
    quote = pki.td_quote(bytes(64), M)
    waiters = [asyncio.create_task(cache.get(quote, NOW)) for _ in range(5)]
    await asyncio.sleep(0)
    pccs.hold.set()
    results = await asyncio.gather(*waiters)
    assert pccs.calls == 1
    assert all(r is results[0] for r in results)


async def test_failures_are_not_cached(pki: DcapTestPki) -> None:
    pccs = Pccs(pki, valid_for=3600)
    pccs.fail = True
    cache = CollateralCache("https://pccs.test", fetch=pccs)
    quote = pki.td_quote(bytes(64), M)
    with pytest.raises(ValueError, match="PCCS unreachable"):
        await cache.get(quote, NOW)
    pccs.fail = False
    await cache.get(quote, NOW)
    assert pccs.calls == 2


def test_policy_defaults_are_strict() -> None:
    p = Policy()
    assert p.mode == "dcap"
    assert p.accepted_tcb_statuses == ("UpToDate",)
    assert p.test_root_ca is None
    assert p.pccs_url == INTEL_PCS_URL
    assert p.reattest_interval_s == 600
    assert p.mrtd_allowlist is None and p.compose_hash_allowlist is None


def test_policy_from_toml(tmp_path: Path) -> None:
    (tmp_path / "root.der").write_bytes(b"x")
    toml = tmp_path / "proxy.toml"
    toml.write_text(
        "[upstream]\nbase_url = 'http://127.0.0.1:1'\n\n"
        "[attestation]\n"
        "accepted_tcb_statuses = ['UpToDate', 'SWHardeningNeeded']\n"
        f"mrtd_allowlist = ['0x{'AB' * 48}']\n"
        "reattest_interval_s = 300\n"
        "test_root_ca = 'root.der'\n"
    )
    p = load_policy(toml)
    assert p.accepted_tcb_statuses == ("UpToDate", "SWHardeningNeeded")
    assert p.mrtd_allowlist == ("ab" * 48,)
    assert p.reattest_interval_s == 300
    assert p.test_root_ca == tmp_path / "root.der"  # relative to the file, not the cwd
    assert p.load_test_root() == b"x"


def test_policy_without_table_is_default(tmp_path: Path) -> None:
    toml = tmp_path / "proxy.toml"
    toml.write_text("[upstream]\n")
    assert load_policy(toml) == Policy()


@pytest.mark.parametrize(
    "table",
    [
        {"accepted_tcb_status": ["UpToDate"]},  # typo: unknown key
        {"accepted_tcb_statuses": []},
        {"mrtd_allowlist": ["abcd"]},
        {"compose_hash_allowlist": ["zz" * 32]},
        {"mode": "trust-me"},
        {"reattest_interval_s": 0},
        {"pccs_url": "ftp://pccs"},
    ],
)
def test_bad_policy_is_refused(table: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        Policy.model_validate(table)
