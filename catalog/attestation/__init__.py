"""Hardware attestation of upstream models (Intel TDX via dcap-qvl).

The gateway's entry points: :class:`Policy` (the ``[attestation]`` settings), the pure
:func:`verify_evidence`, evidence sources (:class:`EvidenceSource`, :class:`NearAiSource`) and
:class:`AttestationService`, which keeps one cached :class:`Verdict` per model so the request
path only ever does a dictionary read.

Wiring, roughly::

    policy = Policy.model_validate(toml["attestation"])            # or load_policy(path)
    source = NearAiSource(upstream_origin, upstream_key, httpx_client)
    service = AttestationService(source, policy)
    await service.start()                  # background attest / re-attest, capped concurrency
    service.set_models(confidential_ids)   # after each catalog refresh
    reason = service.refusal(model)        # on the request path: None = may serve
    verdict = await service.attest_now(model, client_nonce)  # client-requested evidence
    service.note_signing_key(model, address)  # a response signed by another key -> re-attest
    await service.stop()

Against the sandbox: fetch ``GET /_sandbox/evidence/root_ca.der`` into a file, set
``test_root_ca`` to it (and ``mrtd_allowlist`` to its ``X-Sandbox-Mrtd`` header). The sandbox
ships collateral inside its evidence; that is used only while ``test_root_ca`` is set. Real
upstreams ship none, and collateral then comes from ``pccs_url`` (cached until nextUpdate).

NVIDIA GPU evidence (``nvidia_payload``) is verified offline by :mod:`.gpu` with the nonce the
quote binds (chain to NVIDIA's pinned root, signed SPDM measurements, RIMs and OCSP answers
when supplied); the verdict's ``gpu`` part says which checks passed. The sandbox signs its
GPU evidence under a test GPU root, trusted only through ``gpu_test_root_ca``.

Chutes (``upstream.kind = "chutes"``) is attested per instance instead: :mod:`.chutes` verifies
each instance's quote with the same checks plus Chutes' binding (our nonce and the instance's
E2EE key, its certificate), and :class:`teegate.catalog.chutes.pool.InstancePool` keeps the
verified instances of one chute and hands out per-request tickets.
"""

from teegate.catalog.attestation.chutes import (
    ChutesEvidenceClient,
    ChutesVerifier,
    parse_evidence,
    parse_instances,
    verify_instances,
)
from teegate.catalog.attestation.collateral import (
    CollateralCache,
    collateral_window,
    load_collateral,
)
from teegate.catalog.attestation.evidence import EvidenceError, NodeEvidence
from teegate.catalog.attestation.gpu import GpuRequirements, GpuVerdict, verify_gpu_payload
from teegate.catalog.attestation.near_ai import NearAiSource, parse_near_ai
from teegate.catalog.attestation.policy import Policy, load_policy
from teegate.catalog.attestation.service import AttestationService
from teegate.catalog.attestation.source import EvidenceFetchError, EvidenceSource
from teegate.catalog.attestation.verdict import InstanceVerdict, Verdict
from teegate.catalog.attestation.verifier import verify_evidence

__all__ = [
    "AttestationService",
    "ChutesEvidenceClient",
    "ChutesVerifier",
    "CollateralCache",
    "EvidenceError",
    "EvidenceFetchError",
    "EvidenceSource",
    "GpuRequirements",
    "GpuVerdict",
    "InstanceVerdict",
    "NearAiSource",
    "NodeEvidence",
    "Policy",
    "Verdict",
    "collateral_window",
    "load_collateral",
    "load_policy",
    "parse_evidence",
    "parse_instances",
    "parse_near_ai",
    "verify_evidence",
    "verify_gpu_payload",
    "verify_instances",
]
