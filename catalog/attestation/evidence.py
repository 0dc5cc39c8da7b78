"""Evidence in one shape, whatever the upstream's wire format.

Each upstream format (NEAR AI / Phala today; Chutes, Tinfoil later) is one module with a
``parse`` function turning the JSON it received into :class:`NodeEvidence` items, one per TD
that serves the model. The verifier only ever sees this shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


class EvidenceError(ValueError):
    """The evidence is malformed: missing fields, bad hex, wrong types."""


@dataclass(frozen=True)
class NodeEvidence:
    """What one TD sent: its quote and the claims the quote is expected to back."""

    quote: bytes
    signing_address: str | None = None
    """Hex; for ECDSA an Ethereum address (20 bytes), for Ed25519 the public key."""
    signing_algo: Literal["ecdsa", "ed25519"] = "ecdsa"
    signing_public_key: str | None = None
    request_nonce: str | None = None
    """The nonce the upstream says it answered (hex), echoed by NEAR AI / Phala."""
    event_log: list[dict[str, Any]] | None = None
    app_compose: str | None = None
    gpu_payload: Any = None
    collateral: dict[str, Any] | None = None
    """Collateral shipped inside the evidence (the sandbox does this; real upstreams don't)."""

    def signing_address_bytes(self) -> bytes | None:
        if self.signing_address is None:
            return None
        try:
            return bytes.fromhex(self.signing_address.removeprefix("0x"))
        except ValueError as e:
            raise EvidenceError("signing_address is not hex") from e


EvidenceParser = Callable[[dict[str, Any]], list[NodeEvidence]]


def hex_bytes(value: Any, field: str) -> bytes:
    """Decode a hex string field, with or without 0x."""
    if not isinstance(value, str) or not value:
        raise EvidenceError(f"{field} must be a non-empty hex string")
    try:
        return bytes.fromhex(value.strip().removeprefix("0x"))
    except ValueError as e:
        raise EvidenceError(f"{field} is not hex") from e
