"""dstack event logs: the NEAR AI sample replays to its quote, and forgeries are caught."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import dcap_qvl
import pytest

from teegate.catalog.attestation import EvidenceError, Policy, verify_evidence
from teegate.catalog.attestation.eventlog import replay, runtime_event_digest
from tests.support.tdx_vectors import VECTORS, collateral_text, quote_bytes, vector

NAME = "dstack-nearai"


def _events() -> list[dict[str, Any]]:
    return json.loads((VECTORS / NAME / "event_log.json").read_text())


def _info() -> dict[str, Any]:
    return json.loads((VECTORS / NAME / "info.json").read_text())


def _verify(evidence_extra: dict[str, Any], policy: Policy | None = None):
    evidence = {"intel_quote": quote_bytes(NAME).hex(), **evidence_extra}
    return verify_evidence(
        evidence,
        nonce=None,
        policy=policy or Policy(),
        collateral=collateral_text(NAME),
        now=vector(NAME)["at"],
        require_binding=False,
    )


def test_replay_reproduces_the_quote_rtmrs() -> None:
    report = dcap_qvl.parse_quote(quote_bytes(NAME)).report
    result = replay(_events())
    assert result.rtmrs == tuple(bytes(getattr(report, f"rt_mr{i}")) for i in range(4))
    assert result.forged_events == ()


def test_compose_hash_event_matches_info_and_mr_config_id() -> None:
    info = _info()
    compose = hashlib.sha256(info["tcb_info"]["app_compose"].encode()).digest()
    assert replay(_events()).compose_hash == compose
    assert compose.hex() == info["compose_hash"]
    mr_config_id = dcap_qvl.parse_quote(quote_bytes(NAME)).report.mr_config_id
    assert mr_config_id == b"\x01" + compose + bytes(15)


def test_full_evidence_passes_every_event_log_check() -> None:
    verdict = _verify({"event_log": _events(), "info": _info()})
    assert verdict.ok, verdict.reason
    for check in (
        "event_log_replays",
        "event_log_runtime_digests",
        "event_log_compose_hash",
        "app_compose_matches",
    ):
        assert verdict.checks[check] is True
    assert verdict.compose_hash == _info()["compose_hash"]


def test_event_log_inside_info_as_json_text_is_used() -> None:
    # dstack's info carries tcb_info.event_log as a JSON string; the top-level log may be absent.
    info = _info()
    info["tcb_info"]["event_log"] = json.dumps(_events())
    verdict = _verify({"info": json.dumps(info)})
    assert verdict.ok, verdict.reason
    assert verdict.checks["event_log_replays"] is True


def test_a_dropped_event_no_longer_replays() -> None:
    events = _events()
    del events[3]
    verdict = _verify({"event_log": events, "info": _info()})
    assert not verdict.ok
    assert verdict.reason == "attestation failed: event log does not reproduce RTMR0-3"


def test_a_swapped_compose_payload_is_caught_even_with_its_digest_kept() -> None:
    events = _events()
    ev = next(e for e in events if e["event"] == "compose-hash")
    ev["event_payload"] = hashlib.sha256(b"another app").hexdigest()
    verdict = _verify({"event_log": events, "info": _info()})
    assert verdict.checks["event_log_replays"] is True  # digests untouched
    assert verdict.checks["event_log_runtime_digests"] is False
    assert not verdict.ok


def test_a_consistent_log_for_another_app_is_refused() -> None:
    # Rebuild the compose-hash event honestly for another app: digests consistent, but the
    # registers no longer match the quote.
    events = _events()
    ev = next(e for e in events if e["event"] == "compose-hash")
    payload = hashlib.sha256(b"another app").digest()
    ev["event_payload"] = payload.hex()
    ev["digest"] = runtime_event_digest(ev["event_type"], ev["event"], payload).hex()
    verdict = _verify({"event_log": events, "info": _info()})
    assert verdict.checks["event_log_runtime_digests"] is True
    assert verdict.checks["event_log_replays"] is False
    assert not verdict.ok


def test_app_compose_must_match_the_measured_hash() -> None:
    info = copy.deepcopy(_info())
    info["tcb_info"]["app_compose"] += " "
    verdict = _verify({"event_log": _events(), "info": info})
    assert not verdict.ok
    assert verdict.checks["app_compose_matches"] is False


def test_compose_hash_allowlist() -> None:
    good = _info()["compose_hash"]
    ok = _verify({"info": _info()}, Policy(compose_hash_allowlist=(good,)))
    assert ok.ok and ok.checks["compose_hash_allowed"] is True
    bad = _verify({"info": _info()}, Policy(compose_hash_allowlist=("00" * 32,)))
    assert not bad.ok and bad.checks["compose_hash_allowed"] is False


def test_rtmr_allowlists() -> None:
    rtmr0 = _info()["tcb_info"]["rtmr0"]
    ok = _verify(
        {}, Policy(rtmr0_allowlist=(rtmr0,), mrtd_allowlist=(_info()["tcb_info"]["mrtd"],))
    )
    assert ok.ok and ok.checks["rtmr0_allowed"] is True and ok.checks["mrtd_allowed"] is True
    bad = _verify({}, Policy(rtmr1_allowlist=(rtmr0,)))
    assert not bad.ok and bad.checks["rtmr1_allowed"] is False


def test_required_event_log() -> None:
    verdict = _verify({}, Policy(require_event_log=True))
    assert not verdict.ok
    assert verdict.reason == "attestation failed: no event log in the evidence"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e[0].update(imr=4),
        lambda e: e[0].update(digest="abcd"),
        lambda e: e[0].update(event_type="x"),
        lambda e: e.append(next(x for x in e if x["event"] == "compose-hash")),
    ],
)
def test_malformed_logs_raise(mutate) -> None:
    events = _events()
    mutate(events)
    with pytest.raises(EvidenceError):
        replay(events)
