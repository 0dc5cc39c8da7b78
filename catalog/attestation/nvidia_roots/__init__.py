"""NVIDIA's two public roots for GPU attestation, pinned by the SHA-256 of their DER.

Copied verbatim from NVIDIA/nvtrust (``local_gpu_verifier/src/verifier/certs``). Loading
checks the hash, so an edited file fails loudly instead of moving the trust anchor.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

from cryptography import x509
from cryptography.hazmat.primitives import serialization

DEVICE_ROOT_SHA256 = "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
"""NVIDIA Device Identity CA: the last certificate of every GPU's device chain."""
RIM_ROOT_SHA256 = "12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1"
"""NVIDIA CoRIM signing Root CA: the last certificate in a RIM's XML KeyInfo chain."""


def _load(name: str, sha256: str) -> x509.Certificate:
    pem = resources.files(__package__).joinpath(name).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    if hashlib.sha256(der).hexdigest() != sha256:
        raise RuntimeError(f"pinned NVIDIA root {name} does not match its SHA-256")
    return cert


@cache
def device_root() -> x509.Certificate:
    return _load("nvidia-device-identity-ca.pem", DEVICE_ROOT_SHA256)


@cache
def rim_root() -> x509.Certificate:
    return _load("nvidia-corim-signing-root-ca.pem", RIM_ROOT_SHA256)
