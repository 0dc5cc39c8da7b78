"""The two JSON views the dashboard needs beyond the admin API's own answers.

- :func:`attestation_details`: per confidential model, the gate's verdict with what was
  checked (the verdict summary: quote, TCB, measurements, signing key, GPU), when it was last
  verified and until when it holds, why the model is refused if it is, and a SHA-256 of each
  piece of evidence as received, so an operator can compare it with what a client's own
  ``/v1/attestation/report`` returns without the page carrying kilobytes of quote hex.
- :func:`keyholder_account`: what ``GET /v1/account`` answers a key holder, built by the
  same function (:func:`teegate.addons.account.account_view`).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from teegate.addons.account import account_view
from teegate.addons.attestation import AttestationSync
from teegate.addons.catalogsync import CatalogSync
from teegate.ledger import ApiKey, Ledger


def evidence_hashes(evidence: dict[str, Any]) -> dict[str, str]:
    """``{field: sha256 hex}``: a text field's UTF-8 bytes, anything else its canonical JSON."""
    out = {}
    for name, value in sorted(evidence.items()):
        raw = (
            value
            if isinstance(value, str)
            else json.dumps(value, sort_keys=True, separators=(",", ":"))
        )
        out[name] = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()
    return out


def attestation_details(catalog: CatalogSync, attestation: AttestationSync) -> dict[str, Any]:
    snap = catalog.current()
    now = time.time()
    models = []
    for model in sorted(snap.models):
        verdict = attestation.verdict(model)
        refusal = attestation.refusal(model)
        described = attestation.describe(model)
        models.append(
            {
                "model": model,
                "served": refusal is None,
                "refusal": refusal,
                "verified": bool(described.get("verified")),
                "verdict": verdict.summary() if verdict is not None else None,
                "evidence_sha256": evidence_hashes(verdict.evidence) if verdict else {},
                "evidence_kind": described.get("evidence"),
                "instances": described.get("instances", []),
                "e2ee": bool(described.get("e2ee")),
            }
        )
    return {
        "object": "attestation.details",
        "mode": attestation.mode,
        "now": int(now),
        "catalog_fetched_at": int(snap.fetched_at),
        "not_confidential": sorted(snap.non_confidential),
        "data": models,
    }


async def keyholder_account(ledger: Ledger, key_id: int) -> dict[str, Any] | None:
    """The key's account view, or None when the key is gone or revoked."""
    found = await ledger.list_keys(key_id=key_id)
    if not found or found[0].revoked_ms is not None:
        return None
    info = found[0]
    key = ApiKey(info.key_id, info.account_id, info.label, info.rate_limit)
    return await account_view(ledger, key)
