"""What a gateway must trust to verify the sandbox's (test-PKI) attestation evidence.

The sandbox signs its TDX quotes under a test root CA made when it starts, and publishes that
root (``GET /_sandbox/evidence/root_ca.der``) with its TD's MRTD and compose hash (response
headers). ``teegate sandbox``, the test harness and the benchmark all point the gateway's
``[attestation]`` at those, so the sandbox is verified the way a real upstream would be, only
against the test root. This module fetches them over HTTP: it never imports the sandbox.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from teegate.catalog.attestation import Policy

ROOT_PATH = "/_sandbox/evidence/root_ca.der"
ROOT_FILE = "sandbox-test-root-ca.der"
GPU_ROOT_PATH = "/_sandbox/evidence/gpu_root_ca.pem"
GPU_ROOT_FILE = "sandbox-gpu-root-ca.pem"


class SandboxTrustError(RuntimeError):
    """The upstream did not publish a test root (not a sandbox, or not reachable)."""


@dataclass(frozen=True)
class SandboxTrust:
    """The sandbox's test root (written to a file) and the measurements it publishes."""

    root_ca: Path
    mrtd: str
    compose_hash: str
    gpu_root_ca: Path | None = None
    """The sandbox's test GPU root (PEM), for ``gpu_test_root_ca``."""

    def settings(self) -> dict[str, Any]:
        """``[attestation]`` keys: the test roots plus allow-lists pinning the sandbox's TD."""
        found: dict[str, Any] = {
            "test_root_ca": str(self.root_ca),
            "mrtd_allowlist": [self.mrtd],
            "compose_hash_allowlist": [self.compose_hash],
        }
        if self.gpu_root_ca is not None:
            found["gpu_test_root_ca"] = str(self.gpu_root_ca)
        return found

    def toml(self, skip: set[str] | frozenset[str] = frozenset()) -> str:
        """The settings as ``attestation.<key> = value`` lines (keys in ``skip`` left out)."""
        return "".join(
            f"attestation.{key} = {json.dumps(value)}\n"  # JSON strings/lists are valid TOML
            for key, value in self.settings().items()
            if key not in skip
        )


def fetch_sandbox_trust(
    base_url: str, dest_dir: Path, *, verify: Any = True, timeout_s: float = 10.0
) -> SandboxTrust:
    """Fetch the sandbox's test root into ``dest_dir`` and read its published measurements."""
    url = base_url.rstrip("/") + ROOT_PATH
    try:
        resp = httpx.get(url, verify=verify, timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as e:
        raise SandboxTrustError(f"{url}: {type(e).__name__}") from e
    mrtd = resp.headers.get("x-sandbox-mrtd", "")
    compose = resp.headers.get("x-sandbox-compose-hash", "")
    if resp.status_code != 200 or not resp.content or not (mrtd and compose):
        raise SandboxTrustError(f"{url}: HTTP {resp.status_code}, no sandbox test root")
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / ROOT_FILE
    path.write_bytes(resp.content)
    gpu_path = None
    gpu_url = base_url.rstrip("/") + GPU_ROOT_PATH
    try:
        gpu = httpx.get(gpu_url, verify=verify, timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as e:
        raise SandboxTrustError(f"{gpu_url}: {type(e).__name__}") from e
    if gpu.status_code == 200 and gpu.content.startswith(b"-----BEGIN CERTIFICATE"):
        gpu_path = (dest_dir / GPU_ROOT_FILE).resolve()
        gpu_path.write_bytes(gpu.content)
    return SandboxTrust(
        root_ca=path.resolve(),
        mrtd=mrtd.lower(),
        compose_hash=compose.lower(),
        gpu_root_ca=gpu_path,
    )


def sandbox_policy(policy: Policy, trust: SandboxTrust) -> Policy:
    """``policy`` pointed at the sandbox (dcap mode only; flag mode verifies nothing)."""
    if policy.mode != "dcap":
        return policy
    return Policy.model_validate({**policy.model_dump(), **trust.settings()})


def banner(policy: Policy) -> str:
    """What ``teegate sandbox`` says about attestation: loudly, when a test root is trusted."""
    if policy.mode == "flag":
        return (
            "  attestation: FLAG mode: the catalog's confidential flag is trusted; "
            "no hardware attestation is verified"
        )
    gpu = (
        f"    GPU evidence against the sandbox's TEST GPU root {policy.gpu_test_root_ca}\n"
        if policy.gpu_test_root_ca is not None
        else ""
    )
    return (
        "  attestation: dcap, quotes verified against the sandbox's TEST root CA\n"
        f"    {policy.test_root_ca}\n"
        f"{gpu}"
        "    !!! NOT Intel's root: these 'TDX quotes' are simulated. Never configure\n"
        "    !!! attestation.test_root_ca on a gateway that serves real traffic."
    )
