"""Helpers for the Chutes-flavoured process tests (tests/chutes): the gateway settings that
select Chutes, and what the sandbox's front door relayed."""

from __future__ import annotations

import httpx

from tests.support.reattest import until
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE

__all__ = ["CHUTES", "FAST", "TEE", "door_mark", "front_door", "mark", "until"]

CHUTES = 'upstream.kind = "chutes"\n'
FAST = "attestation.reattest_interval_s = 2\nattestation.retry_interval_s = 1\n"


def front_door(upstream: SandboxProc, since: int = 0) -> dict:
    """What the sandbox's front door relayed (entries after the ``since``-th), and whether any
    of it was ever readable."""
    resp = httpx.get(f"{upstream.base_url}/_sandbox/chutes", timeout=10)
    resp.raise_for_status()
    doc = resp.json()
    doc["front_door"] = [e for e in doc["front_door"] if e["seq"] > since]
    return doc


def door_mark(upstream: SandboxProc) -> int:
    """The front door's last entry number now (a ``since`` for :func:`front_door`)."""
    return max((e["seq"] for e in front_door(upstream)["front_door"]), default=0)


def mark(upstream: SandboxProc, marker: str) -> None:
    """Have the front door flag any relayed body containing ``marker``."""
    httpx.post(
        f"{upstream.base_url}/_sandbox/chutes/marker", json={"marker": marker}, timeout=10
    ).raise_for_status()
