"""The gateway's own certificate authority, for intercepting TLS to LLM API hosts.

mitmproxy reads its CA from ``<confdir>/mitmproxy-ca.pem`` and creates one named
"mitmproxy" if the file is missing. We create it first, in the same layout, so the
certificate an operator installs in trust stores says what it is ("teegate egress CA").
The private key file is owner-only (mitmproxy writes it under a 0o77 umask) and the
directory is created 0700; a lock keeps ``teegate ca path`` and a starting gateway from
creating two different CAs at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mitmproxy import certs
from mitmproxy.options import CONF_BASENAME, KEY_SIZE

CA_ORGANIZATION = "teegate"
CA_COMMON_NAME = "teegate egress CA"


def ca_cert_path(confdir: Path) -> Path:
    """The public certificate clients must trust (PEM)."""
    return Path(confdir).expanduser() / f"{CONF_BASENAME}-ca-cert.pem"


def ensure_ca(confdir: Path) -> Path:
    """Create the CA in ``confdir`` unless one is there; return the certificate's path."""
    directory = Path(confdir).expanduser()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(directory / ".ca.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / f"{CONF_BASENAME}-ca.pem").exists():
            certs.CertStore.create_store(
                directory,
                CONF_BASENAME,
                KEY_SIZE,
                organization=CA_ORGANIZATION,
                cn=CA_COMMON_NAME,
            )
    cert = ca_cert_path(directory)
    if not cert.exists():
        # A key without its certificate file: someone deleted half the CA. Refuse rather
        # than hand out a path that does not exist.
        raise FileNotFoundError(f"{cert} is missing but {directory} holds a CA key")
    os.chmod(directory / f"{CONF_BASENAME}-ca.pem", 0o600)
    return cert
