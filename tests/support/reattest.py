"""Flipping what the sandbox attests and waiting for a gateway (another process) to notice:
polling with a deadline, since re-attestation runs on the gateway's own schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai

from tests.support.sandbox_proc import SandboxProc
from tests.support.wait import until  # noqa: F401  (re-exported: tests import it from here)

MSG = [{"role": "user", "content": "hi"}]
# Re-attest every second, and retry failures as often, so a flip shows within seconds.
FAST = (
    "catalog.refresh_interval_s = 1\n"
    "attestation.reattest_interval_s = 1\n"
    "attestation.retry_interval_s = 1\n"
)


def refusal(client: openai.OpenAI, model: str) -> dict[str, Any] | None:
    """The error body if a chat completion for ``model`` is refused, None when served."""
    try:
        client.chat.completions.create(model=model, messages=MSG)
    except openai.APIStatusError as e:
        return {"status": e.status_code, **(e.body if isinstance(e.body, dict) else {})}
    return None


def gpu_root_file(upstream: SandboxProc, folder: Path) -> Path:
    """The sandbox's published test GPU root, saved as ``folder/gpu-root.pem``."""
    resp = httpx.get(f"{upstream.base_url}/_sandbox/evidence/gpu_root_ca.pem", timeout=10)
    resp.raise_for_status()
    path = folder / "gpu-root.pem"
    path.write_bytes(resp.content)
    return path


def root_ca(upstream: SandboxProc) -> httpx.Response:
    """The sandbox's test root (DER) with its MRTD and compose hash in the headers."""
    resp = httpx.get(f"{upstream.base_url}/_sandbox/evidence/root_ca.der", timeout=10)
    resp.raise_for_status()
    return resp
