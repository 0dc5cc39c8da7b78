"""``GET /chutes/{chute_id}/evidence?nonce=<64 hex>``: per-instance TDX evidence, Chutes' shape.

Why the binding is built this way: it is what Chutes instances do (``chutes`` library,
``TeeEvidenceService``; confirmed against the live fleet by the Rust reference verifier in
``nearai/cloud-api``). Each instance asks for a quote whose ``report_data`` is

    sha256((nonce + e2e_pubkey_b64).encode())  ‖  sha256(DER SubjectPublicKeyInfo of its cert)

over the *string* forms: the nonce exactly as the caller sent it and the base64 key exactly as
``/e2e/instances`` lists it. So a gateway that checks both halves knows the quote is fresh and
that the enclave holds the key it is about to encrypt to.

Answer (as ``api/chute/router.py`` ``TeeChuteEvidence``): ``{"evidence": [{"quote": base64,
"gpu_evidence": [dicts], "instance_id", "certificate": base64 DER}], "failed_instance_ids":
[...]}``. ``gpu_evidence`` is the test GPU hierarchy's (``sandbox/gpu_evidence.py``, same
root as the NEAR-format evidence; one GPU per instance, which keeps re-attesting a whole
fleet every few seconds in the tests cheap), its signed SPDM request over the same 32 bytes
as ``report_data[0:32]``, as a Chutes node's
attestation service does (``chutesai/sek8s`` ``/server/attest`` hands one nonce to both the
quote and NVIDIA's SDK); under ``chutes_gpu_stale_nonce`` the first instance's GPUs sign an
old nonce instead (canned or replayed GPU evidence).

One field the real API does not send, as in the NEAR-format evidence: ``collateral``
(dcap_qvl JSON signed under the sandbox's test root) so a gateway can verify offline. The quote
is minted by the same test PKI and TD image as the NEAR-format evidence (``sandbox/evidence.py``),
so an operator pins the same root and measurements.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teegate.sandbox.behaviour import Behaviour
from teegate.sandbox.chutes.fleet import Fleet, Instance
from teegate.sandbox.evidence import EvidenceMinter
from teegate.sandbox.gpu_evidence import GpuTestPki

NONCE_RE = re.compile(r"[0-9a-fA-F]{64}")
STALE_GPU_NONCE = hashlib.sha256(b"an old Chutes GPU nonce").digest()
GPUS = GpuTestPki(gpus=1)


def spki_sha256(cert_der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def report_data(nonce: str, key_b64: str, cert_der: bytes) -> bytes:
    """The 64 bytes a Chutes instance's quote carries (see the module docstring)."""
    return hashlib.sha256((nonce + key_b64).encode()).digest() + spki_sha256(cert_der)


def _item(minter: EvidenceMinter, inst: Instance, nonce: str, behaviour: Behaviour) -> dict:
    data = report_data(nonce, inst.bound_key_b64(behaviour), inst.cert_der)
    quote = minter.pki.td_quote(data, minter.measurements("valid"))
    stale = inst.index == 0 and behaviour.chutes_gpu_stale_nonce
    return {
        "quote": base64.b64encode(quote).decode(),
        "gpu_evidence": GPUS.items(STALE_GPU_NONCE if stale else data[:32]),
        "instance_id": inst.instance_id,
        "certificate": base64.b64encode(inst.cert_der).decode(),
        "collateral": minter.collateral("tdx", stale=False),
    }


def chute_evidence(
    fleet: Fleet, minter: EvidenceMinter, chute_id: str, nonce: str, behaviour: Behaviour
) -> dict[str, Any]:
    """Evidence for every instance of the chute; the ones without TEE evidence are named."""
    evidence: list[dict[str, Any]] = []
    failed: list[str] = []
    for inst in fleet.instances(chute_id):
        if inst.has_tee_evidence(behaviour):
            evidence.append(_item(minter, inst, nonce, behaviour))
        else:
            failed.append(inst.instance_id)
    return {"evidence": evidence, "failed_instance_ids": failed}
