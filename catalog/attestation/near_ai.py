"""Evidence in the public format of NEAR AI's and Phala's OpenAI-compatible TEE gateways.

``GET {upstream}/v1/attestation/report?model=<id>&nonce=<64 hex>&signing_algo=ecdsa`` answers
``signing_address``, ``signing_algo``, ``request_nonce``, ``intel_quote`` (hex),
``nvidia_payload``, ``event_log``, ``info`` (dstack's, with ``tcb_info.app_compose``) and, for
models served by several TDs, ``all_attestations`` (one such object per TD). There
``report_data[0:32]`` is the signing address right-padded with zeros (or, with TLS binding,
``sha256(address || TLS certificate fingerprint)``) and ``report_data[32:64]`` is the nonce.

Upstreams are inconsistent about nesting JSON in strings (``info``, ``tcb_info`` and
``event_log`` are sometimes JSON text), so each is accepted either way.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from teegate.catalog.attestation.evidence import EvidenceError, NodeEvidence, hex_bytes
from teegate.catalog.attestation.source import EvidenceFetchError

MAX_EVIDENCE_BYTES = 8 * 1024 * 1024


def _maybe_json(value: Any, field: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise EvidenceError(f"{field} is neither an object nor JSON text") from e
    return value


def _optional_str(entry: dict[str, Any], field: str) -> str | None:
    value = entry.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise EvidenceError(f"{field} must be a string")
    return value


def _event_log(entry: dict[str, Any], tcb_info: dict[str, Any]) -> list[dict[str, Any]] | None:
    raw = entry.get("event_log")
    if raw in (None, "", []):
        raw = tcb_info.get("event_log")
    if raw in (None, "", []):
        return None
    events = _maybe_json(raw, "event_log")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise EvidenceError("event_log must be a list of events")
    return events


def _node(entry: Any) -> NodeEvidence:
    if not isinstance(entry, dict):
        raise EvidenceError("attestation must be a JSON object")
    info = _maybe_json(entry.get("info") or {}, "info")
    if not isinstance(info, dict):
        raise EvidenceError("info must be an object")
    tcb_info = _maybe_json(info.get("tcb_info") or {}, "info.tcb_info")
    if not isinstance(tcb_info, dict):
        raise EvidenceError("info.tcb_info must be an object")
    app_compose = tcb_info.get("app_compose")
    if app_compose is not None and not isinstance(app_compose, str):
        raise EvidenceError("info.tcb_info.app_compose must be a string")
    algo = (_optional_str(entry, "signing_algo") or "ecdsa").lower()
    if algo not in ("ecdsa", "ed25519"):
        raise EvidenceError(f"unsupported signing_algo {algo!r}")
    collateral = entry.get("collateral")
    if collateral is not None:
        collateral = _maybe_json(collateral, "collateral")
        if not isinstance(collateral, dict):
            raise EvidenceError("collateral must be an object")
    return NodeEvidence(
        quote=hex_bytes(entry.get("intel_quote"), "intel_quote"),
        signing_address=_optional_str(entry, "signing_address"),
        signing_algo=algo,  # type: ignore[arg-type]
        signing_public_key=_optional_str(entry, "signing_public_key"),
        request_nonce=_optional_str(entry, "request_nonce"),
        event_log=_event_log(entry, tcb_info),
        app_compose=app_compose,
        gpu_payload=entry.get("nvidia_payload"),
        collateral=collateral,
    )


def parse_near_ai(evidence: dict[str, Any]) -> list[NodeEvidence]:
    """Every TD's evidence in a NEAR AI / Phala attestation report."""
    if not isinstance(evidence, dict):
        raise EvidenceError("evidence must be a JSON object")
    nodes = evidence.get("all_attestations")
    if nodes:
        if not isinstance(nodes, list):
            raise EvidenceError("all_attestations must be a list")
        return [_node(n) for n in nodes]
    return [_node(evidence)]


class NearAiSource:
    """Fetches NEAR AI / Phala attestation reports from the upstream, with its API key."""

    name = "near-ai"

    def __init__(self, base_url: str, api_key: str | None, client: httpx.AsyncClient) -> None:
        self._url = base_url.rstrip("/") + "/v1/attestation/report"
        self._headers = {"accept": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._client = client

    async def fetch(self, model: str, nonce: bytes) -> dict[str, Any]:
        if len(nonce) != 32:
            raise ValueError("nonce must be 32 bytes")
        params = {"model": model, "nonce": nonce.hex(), "signing_algo": "ecdsa"}
        try:
            resp = await self._client.get(self._url, params=params, headers=self._headers)
        except httpx.HTTPError as e:
            raise EvidenceFetchError(f"attestation report unreachable: {type(e).__name__}") from e
        if resp.status_code != 200:
            raise EvidenceFetchError(f"attestation report answered HTTP {resp.status_code}")
        if len(resp.content) > MAX_EVIDENCE_BYTES:
            raise EvidenceFetchError("attestation report too large")
        try:
            doc = resp.json()
        except ValueError as e:
            raise EvidenceFetchError("attestation report is not JSON") from e
        if not isinstance(doc, dict):
            raise EvidenceFetchError("attestation report is not a JSON object")
        return doc

    def parse(self, evidence: dict[str, Any]) -> list[NodeEvidence]:
        return parse_near_ai(evidence)
