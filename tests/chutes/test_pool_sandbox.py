"""The pool and the Chutes evidence verifier against the sandbox's Chutes flavour, over TCP.

The sandbox mints its quotes independently (``sandbox/chutes/``, no code shared with the
gateway); that this verifier accepts them, and refuses exactly the instances the switches
break, shows both sides agree on the real binding.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from teegate.catalog.attestation import Policy
from teegate.catalog.attestation.gpu import GpuVerdict
from teegate.catalog.chutes.pool import (
    InstancePool,
    NoAttestedInstance,
    PoolSettings,
    build_pool,
)
from tests.support.sandbox_proc import SandboxProc, start_sandbox


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProc]:
    with start_sandbox("--upstream", "chutes", "--chutes-instances", "3") as proc:
        yield proc


@pytest.fixture
def policy(sandbox: SandboxProc, tmp_path: Path) -> Policy:
    sandbox.reset()
    with httpx.Client(base_url=sandbox.base_url, verify=sandbox.verify(), timeout=10) as c:
        root = tmp_path / "root.der"
        root.write_bytes(c.get("/_sandbox/evidence/root_ca.der").content)
        mrtd = c.get("/_sandbox/evidence").json()["mrtd"]
        gpu_root = tmp_path / "gpu-root.pem"
        gpu_root.write_bytes(c.get("/_sandbox/evidence/gpu_root_ca.pem").content)
    return Policy(test_root_ca=root, mrtd_allowlist=(mrtd,), gpu_test_root_ca=gpu_root)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def _chute(sandbox: SandboxProc) -> tuple[str, str]:
    with sandbox.client(timeout=10) as c:
        rows: list[dict[str, Any]] = c.get("/models").json()["data"]
    row = next(r for r in rows if r.get("chute_id"))
    return row["id"], row["chute_id"]


def _pool(sandbox: SandboxProc, policy: Policy, http: httpx.AsyncClient) -> InstancePool:
    model, chute_id = _chute(sandbox)
    return build_pool(
        model,
        chute_id,
        policy=policy,
        client=http,
        api_url=sandbox.base_url,
        api_key=sandbox.api_key,
    )


async def test_all_sandbox_instances_verify(
    sandbox: SandboxProc, policy: Policy, http: httpx.AsyncClient
) -> None:
    pool = _pool(sandbox, policy, http)
    tickets = [await pool.acquire() for _ in range(6)]
    verdict = pool.verdict
    assert verdict is not None and verdict.ok, verdict
    assert verdict.root == "test" and verdict.evidence_kind == "chutes"
    assert len(verdict.instances) == 3 and all(i.ok for i in verdict.instances)
    assert {t.instance_id for t in tickets} == {i.instance_id for i in verdict.instances}
    for t in tickets:
        [iv] = [i for i in verdict.instances if i.instance_id == t.instance_id]
        assert iv.e2e_pubkey == t.e2e_pubkey
        assert isinstance(iv.gpu, GpuVerdict) and iv.gpu.ok and iv.gpu.root == "test"
    assert verdict.gpu == verdict.instances[0].gpu
    await pool.stop()


@pytest.mark.parametrize(
    "switch", ["chutes_unbound_key", "chutes_no_tee_instance", "chutes_gpu_stale_nonce"]
)
async def test_a_broken_instance_is_refused_and_never_handed_out(
    switch: str, sandbox: SandboxProc, policy: Policy, http: httpx.AsyncClient
) -> None:
    sandbox.behaviour(**{switch: True})
    pool = _pool(sandbox, policy, http)
    tickets = [await pool.acquire() for _ in range(6)]
    verdict = pool.verdict
    assert verdict is not None and verdict.ok
    refused = [i for i in verdict.instances if not i.ok]
    assert len(refused) == 1, [i.reason for i in verdict.instances]
    assert refused[0].instance_id not in {t.instance_id for t in tickets}
    if switch == "chutes_gpu_stale_nonce":  # the quote is fine; the GPUs signed an old nonce
        assert refused[0].checks["quote_verified"] and refused[0].gpu.ok is False
        assert "GPU evidence rejected: GPU 0: the signed SPDM" in refused[0].reason
    await pool.stop()


async def test_wrong_measurements_refuse_every_instance(
    sandbox: SandboxProc, policy: Policy, http: httpx.AsyncClient
) -> None:
    strict = policy.model_copy(update={"mrtd_allowlist": ("00" * 48,)})
    pool = _pool(sandbox, strict, http)
    with pytest.raises(NoAttestedInstance, match="MRTD"):
        await pool.acquire()
    assert pool.verdict is not None and not pool.verdict.ok
    await pool.stop()


async def test_a_rotated_key_is_used_only_once_its_new_quote_verifies(
    sandbox: SandboxProc, policy: Policy, http: httpx.AsyncClient
) -> None:
    model, chute_id = _chute(sandbox)
    pool = build_pool(
        model,
        chute_id,
        policy=policy,
        client=http,
        api_url=sandbox.base_url,
        api_key=sandbox.api_key,
        settings=PoolSettings(discovery_interval_s=0.0, evidence_interval_s=0.0),
    )
    await pool.acquire()
    before = {i.instance_id: i.e2e_pubkey for i in pool.verdict.instances}  # type: ignore[union-attr]
    sandbox.behaviour(chutes_rotate_key=True)
    await pool.refill()
    after = {i.instance_id: i.e2e_pubkey for i in pool.verdict.instances if i.ok}  # type: ignore[union-attr]
    rotated = [iid for iid in before if after.get(iid) != before[iid]]
    assert len(rotated) == 1 and rotated[0] in after  # re-verified under its new key
    for _ in range(9):
        t = await pool.acquire()
        assert (
            t.e2e_pubkey
            == after[t.instance_id]
            != (before[t.instance_id] if t.instance_id in rotated else None)
        )
    await pool.stop()


async def test_client_nonce_evidence_is_verified_and_not_stored(
    sandbox: SandboxProc, policy: Policy, http: httpx.AsyncClient
) -> None:
    pool = _pool(sandbox, policy, http)
    await pool.acquire()
    stored = pool.verdict
    nonce = bytes(range(32))
    v = await pool.attest_now(nonce)
    assert v.ok and v.nonce == nonce.hex() and v.evidence["evidence"]
    assert all(i.checks["report_data_nonce_and_key"] for i in v.instances)
    assert pool.verdict == stored
    await pool.stop()
