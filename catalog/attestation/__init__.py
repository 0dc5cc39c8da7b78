"""Hardware attestation of upstream models (Intel TDX via dcap-qvl).

The gateway's entry points: :class:`Policy` (the ``[attestation]`` settings), the pure
:func:`verify_evidence`, evidence sources (:class:`EvidenceSource`, :class:`NearAiSource`) and
:class:`AttestationService`, which keeps one cached :class:`Verdict` per model so the request
path only ever does a dictionary read.
"""

from catalog.attestation.collateral import CollateralCache, collateral_window, load_collateral
from catalog.attestation.evidence import EvidenceError, NodeEvidence
from catalog.attestation.near_ai import NearAiSource, parse_near_ai
from catalog.attestation.policy import Policy, load_policy
from catalog.attestation.service import AttestationService
from catalog.attestation.source import EvidenceFetchError, EvidenceSource
from catalog.attestation.verdict import Verdict
from catalog.attestation.verifier import verify_evidence

__all__ = [
    "AttestationService",
    "CollateralCache",
    "EvidenceError",
    "EvidenceFetchError",
    "EvidenceSource",
    "NearAiSource",
    "NodeEvidence",
    "Policy",
    "Verdict",
    "collateral_window",
    "load_collateral",
    "load_policy",
    "parse_near_ai",
    "verify_evidence",
]
