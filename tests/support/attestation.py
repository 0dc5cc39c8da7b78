"""The ``[attestation]`` keys a test gateway gets by default: real dcap verification of the
sandbox's evidence, against the sandbox's test root (fetched into the gateway's workdir).

Modes (``start_gateway(..., attestation=...)``):

* ``"sandbox"`` (default): dcap mode, ``test_root_ca`` = the sandbox's root, MRTD and compose
  hash pinned to what it publishes, ``gpu_test_root_ca`` = its test GPU root. A key the
  test's ``extra_toml`` sets itself is left to it.
  An upstream that publishes no test root (down, or not a sandbox) gets nothing added, so the
  gateway keeps Intel's root and refuses every model: fail closed.
* ``"flag"``: ``attestation.mode = "flag"`` (the catalog's flag only).
* ``"defaults"``: nothing added (what ``teegate run`` does with an empty table).

An ``[attestation]`` table header in ``extra_toml`` means the test owns the whole table.
"""

from __future__ import annotations

import re
import ssl
import tomllib
from pathlib import Path
from typing import Any

from teegate.sandbox_attestation import SandboxTrustError, fetch_sandbox_trust

MODES = ("sandbox", "flag", "defaults")
TRUST_KEYS = ("test_root_ca", "mrtd_allowlist", "compose_hash_allowlist", "gpu_test_root_ca")


def _sets(extra_toml: str, key: str) -> bool:
    return re.search(rf"^\s*attestation\.{key}\s*=", extra_toml, re.M) is not None


def _upstream_verify(extra_toml: str) -> Any:
    """How to reach an HTTPS sandbox: the CA the gateway itself is told to trust."""
    try:
        ca = tomllib.loads(extra_toml).get("upstream", {}).get("ca_file")
    except tomllib.TOMLDecodeError:
        ca = None
    return ssl.create_default_context(cafile=str(ca)) if ca else True


def attestation_toml(workdir: Path, upstream_url: str, extra_toml: str, mode: str) -> str:
    """Dotted ``attestation.*`` keys for a test gateway's proxy.toml (see the module doc)."""
    if mode not in MODES:
        raise ValueError(f"attestation must be one of {MODES}, not {mode!r}")
    if mode == "defaults" or re.search(r"^\s*\[attestation\]", extra_toml, re.M):
        return ""
    if mode == "flag":
        return "" if _sets(extra_toml, "mode") else 'attestation.mode = "flag"\n'
    given = {k for k in TRUST_KEYS if _sets(extra_toml, k)}
    if len(given) == len(TRUST_KEYS):
        return ""
    try:
        trust = fetch_sandbox_trust(
            upstream_url, workdir, verify=_upstream_verify(extra_toml), timeout_s=5.0
        )
    except SandboxTrustError:
        return ""
    return trust.toml(skip=given)
