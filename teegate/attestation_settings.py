"""The ``[attestation]`` table of ``proxy.toml``: :class:`teegate.catalog.attestation.Policy` as is.

Only what a config file adds is here: a relative ``test_root_ca`` is resolved beside the file
(as ``teegate attest --policy`` does), and the file is checked to be a DER certificate at
load time, so a typo stops the start with the key named instead of refusing every model later.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from teegate.catalog.attestation import Policy


def resolve(policy: Policy, folder: Path) -> Policy:
    """``policy`` with ``test_root_ca`` made absolute (relative to ``folder``) and checked.

    Raises ValueError naming the problem (missing file, not a DER certificate).
    """
    root = policy.test_root_ca
    if root is None:
        return policy
    root = root.expanduser()
    if not root.is_absolute():
        root = (folder / root).resolve()
    try:
        x509.load_der_x509_certificate(root.read_bytes())
    except OSError as e:
        raise ValueError(f"test_root_ca: cannot read {root}: {e.strerror or e}") from None
    except ValueError:
        raise ValueError(f"test_root_ca: {root} is not a DER certificate") from None
    return policy.model_copy(update={"test_root_ca": root})
