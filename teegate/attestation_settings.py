"""The ``[attestation]`` table of ``proxy.toml``: :class:`teegate.catalog.attestation.Policy` as is.

Only what a config file adds is here: relative paths (``test_root_ca``, ``gpu_test_root_ca``,
``gpu_rim_dir``, ``gpu_ocsp_dir``) are resolved beside the file (as ``teegate attest
--policy`` does), and each is checked at load time (a DER certificate, a certificate, a
folder), so a typo stops the start with the key named instead of refusing every model later.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from teegate.catalog.attestation import Policy


def _absolute(path: Path, folder: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (folder / path).resolve()


def _check_root(key: str, root: Path, *, pem_ok: bool) -> None:
    try:
        data = root.read_bytes()
    except OSError as e:
        raise ValueError(f"{key}: cannot read {root}: {e.strerror or e}") from None
    try:
        if pem_ok and data.lstrip().startswith(b"-----BEGIN"):
            x509.load_pem_x509_certificate(data)
        else:
            x509.load_der_x509_certificate(data)
    except ValueError:
        kind = "certificate" if pem_ok else "DER certificate"
        raise ValueError(f"{key}: {root} is not a {kind}") from None


def resolve(policy: Policy, folder: Path) -> Policy:
    """``policy`` with its paths made absolute (relative to ``folder``) and checked.

    Raises ValueError naming the problem (missing file, not a certificate, not a folder).
    """
    update: dict[str, Path] = {}
    for key in ("test_root_ca", "gpu_test_root_ca"):
        value = getattr(policy, key)
        if value is not None:
            update[key] = _absolute(value, folder)
            _check_root(key, update[key], pem_ok=key == "gpu_test_root_ca")
    for key in ("gpu_rim_dir", "gpu_ocsp_dir"):
        value = getattr(policy, key)
        if value is not None:
            update[key] = _absolute(value, folder)
            if not update[key].is_dir():
                raise ValueError(f"{key}: {update[key]} is not a folder")
    return policy.model_copy(update=update) if update else policy
