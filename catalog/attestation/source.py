"""The one interface an upstream's evidence format must implement.

Adding an upstream format (Chutes' per-instance evidence, Tinfoil's TLS-key binding, ...) is
one module with a class satisfying :class:`EvidenceSource`: ``fetch`` gets the raw JSON bound
to our nonce, ``parse`` turns it into :class:`~catalog.attestation.evidence.NodeEvidence`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from teegate.catalog.attestation.evidence import NodeEvidence


class EvidenceFetchError(Exception):
    """The upstream did not hand over evidence (unreachable, HTTP error, not JSON)."""


@runtime_checkable
class EvidenceSource(Protocol):
    """Where attestation evidence for a model comes from, and how to read it."""

    name: str

    async def fetch(self, model: str, nonce: bytes) -> dict[str, Any]:
        """Evidence for ``model`` whose quote(s) should bind ``nonce`` (32 bytes), as received."""
        ...

    def parse(self, evidence: dict[str, Any]) -> list[NodeEvidence]:
        """The evidence of each TD serving the model; raises EvidenceError when malformed."""
        ...
