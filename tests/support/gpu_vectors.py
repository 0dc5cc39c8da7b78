"""The NVIDIA GPU evidence vectors (tests/data/gpu-vectors) and payloads built from them."""

from __future__ import annotations

import base64
import json
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from tests.support.testdata import DATA

# A verbatim copy of ../shared/gpu-vectors, held to it by tests/unit/test_data_copies.py.
GPU_VECTORS = DATA / "gpu-vectors"
_DOC = json.loads((GPU_VECTORS / "MANIFEST.json").read_text())
VECTORS: dict[str, dict[str, Any]] = {v["id"]: v for v in _DOC["vectors"]}


def folder(vector_id: str) -> Path:
    return GPU_VECTORS / VECTORS[vector_id]["dir"]


def expect(vector_id: str, name: str) -> Any:
    return VECTORS[vector_id]["expect"][name]["result"]


def item(chain_pem: bytes, evidence: bytes, arch: str = "HOPPER") -> dict[str, str]:
    return {
        "certificate": base64.b64encode(chain_pem).decode(),
        "evidence": base64.b64encode(evidence).decode(),
        "arch": arch,
    }


def payload(items: list[dict[str, str]], nonce: str | None, arch: str = "HOPPER") -> str:
    """An ``nvidia_payload`` as NEAR AI / Phala reports carry it (JSON text)."""
    doc: dict[str, Any] = {"evidence_list": items, "arch": arch}
    if nonce is not None:
        doc["nonce"] = nonce
    return json.dumps(doc)


def raw_vector_payload(vector_id: str, evidence: bytes | None = None) -> str:
    """V1 / N1 (raw files) wrapped as a payload naming the vector's nonce."""
    d = folder(vector_id)
    ev = evidence if evidence is not None else (d / "evidence.bin").read_bytes()
    nonce = VECTORS["V1"]["expected_nonce"]
    return payload([item((d / "cert_chain.pem").read_bytes(), ev)], nonce)


def payload_file(vector_id: str) -> str:
    return (folder(vector_id) / "nvidia_payload.json").read_text()


@cache
def sandbox_gpu_root_file() -> Path:
    """The sandbox's test GPU root (stable: derived from a fixed seed), as a PEM file."""
    from teegate.sandbox.gpu_evidence import GpuTestPki

    path = Path(tempfile.mkdtemp(prefix="teegate-gpu-root-")) / "gpu-root.pem"
    path.write_bytes(GpuTestPki().root_pem)
    return path


def trusting_sandbox_gpus(policy: Any) -> Any:
    """``policy`` (a :class:`Policy`) that also trusts the sandbox's test GPU root."""
    if policy.gpu_test_root_ca is not None:
        return policy
    return policy.model_copy(update={"gpu_test_root_ca": sandbox_gpu_root_file()})
