"""Does this machine's Python, curl and Node trust the egress CA?

The honest question is whether a certificate the listener presents would verify; short of
signing one, the answer is whether the CA certificate is *in* the store each client actually
loads. Stores are compared by the certificate's DER bytes (its base64 text with the line
breaks removed), so a PEM file holding it among hundreds of others counts, and a file with
another CA of the same name does not.

Which store each client loads:

* Python, httpx and the openai SDK: ``SSL_CERT_FILE`` if set (it *replaces* the store), else
  certifi's bundle; requests: ``REQUESTS_CA_BUNDLE``, else ``CURL_CA_BUNDLE``, else certifi.
* Python's ``ssl.create_default_context()`` (urllib, aiohttp, ...): OpenSSL's default file and
  directory (``ssl.get_default_verify_paths()``, which read ``SSL_CERT_FILE``/``SSL_CERT_DIR``).
* curl: ``CURL_CA_BUNDLE``, else ``SSL_CERT_FILE``, else the bundle it was built with
  (``curl-config --ca``) and the system directory.
* Node: its built-in list plus ``NODE_EXTRA_CA_CERTS`` (it never reads the system store
  unless started with ``--use-openssl-ca``), so only that variable can add the CA.
"""

from __future__ import annotations

import base64
import re
import ssl
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teegate.doctor.report import Check, Status

Which = Callable[[str], str | None]
RunOut = Callable[[list[str]], str | None]

_WHITESPACE = re.compile(rb"\s+")
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # macOS, BSD
)


def run_output(argv: list[str]) -> str | None:
    """A program's stdout (stripped), or None if it is missing or fails."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def ca_fingerprint(ca_pem: Path) -> bytes:
    """What to look for in a store: the CA certificate's DER in base64, no line breaks."""
    cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER))


def holds(path: Path | str | None, needle: bytes) -> bool:
    """Whether the PEM file (or any file in the directory) at ``path`` holds the certificate."""
    if not path:
        return False
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if needle in _WHITESPACE.sub(b"", data):
            return True
    return False


def bundle_fix(ca: Path, variables: str) -> str:
    return (
        f'cat "$(python -m certifi)" {ca} > teegate-bundle.pem\n'
        f"export {variables}   (a bundle: the variable replaces the store, it does not add to it)"
    )


def python_trust(ca: Path, env: Mapping[str, str], certifi_path: str | None) -> Check:
    """httpx/openai and requests: the file each loads must hold the CA."""
    needle = ca_fingerprint(ca)
    loads = {
        "httpx/openai": env.get("SSL_CERT_FILE") or certifi_path,
        "requests": env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or certifi_path,
    }
    missing = {who: path for who, path in loads.items() if not holds(path, needle)}
    if not missing:
        return Check("python trusts the egress CA", Status.OK, "httpx/openai and requests do")
    detail = "; ".join(
        f"{who} loads {path or 'no bundle'}, without it" for who, path in missing.items()
    )
    fix = bundle_fix(
        ca,
        "SSL_CERT_FILE=$PWD/teegate-bundle.pem REQUESTS_CA_BUNDLE=$PWD/teegate-bundle.pem",
    )
    return Check("python trusts the egress CA", Status.FAIL, detail, fix)


def system_trust(ca: Path, paths: ssl.DefaultVerifyPaths | None = None) -> Check:
    """``ssl.create_default_context()``: OpenSSL's default CA file and directory."""
    paths = paths or ssl.get_default_verify_paths()
    needle = ca_fingerprint(ca)
    where = [p for p in (paths.cafile, paths.capath) if p]
    if any(holds(p, needle) for p in where):
        return Check("system store trusts the egress CA", Status.OK, f"found in {', '.join(where)}")
    return Check(
        "system store trusts the egress CA",
        Status.WARN,
        f"not in {', '.join(where) or 'any default path'} (only matters to apps using "
        "ssl.create_default_context(), urllib or aiohttp without SSL_CERT_FILE)",
        f"sudo cp {ca} /usr/local/share/ca-certificates/teegate-egress.crt "
        "&& sudo update-ca-certificates   (Debian/Ubuntu)",
    )


def curl_trust(ca: Path, env: Mapping[str, str], which: Which, run: RunOut) -> Check:
    if which("curl") is None:
        return Check("curl trusts the egress CA", Status.SKIP, "curl is not installed")
    needle = ca_fingerprint(ca)
    chosen = env.get("CURL_CA_BUNDLE") or env.get("SSL_CERT_FILE")
    if chosen:
        stores = [chosen]
    else:
        built_in = run(["curl-config", "--ca"]) if which("curl-config") else None
        stores = [built_in] if built_in else [b for b in SYSTEM_BUNDLES if Path(b).is_file()]
        stores.append("/etc/ssl/certs")
    if any(holds(s, needle) for s in stores if Path(s).exists()):
        return Check("curl trusts the egress CA", Status.OK, f"found in {stores[0]}")
    return Check(
        "curl trusts the egress CA",
        Status.FAIL,
        f"not in {', '.join(stores)}",
        "curl --cacert teegate-bundle.pem ..., or\n"
        + bundle_fix(ca, "CURL_CA_BUNDLE=$PWD/teegate-bundle.pem"),
    )


def node_trust(ca: Path, env: Mapping[str, str], which: Which) -> Check:
    extra = env.get("NODE_EXTRA_CA_CERTS")
    if which("node") is None and not extra:
        return Check("node trusts the egress CA", Status.SKIP, "node is not installed")
    fix = f"export NODE_EXTRA_CA_CERTS={ca}   (adds to Node's list; restart the app)"
    if not extra:
        return Check(
            "node trusts the egress CA", Status.FAIL, "NODE_EXTRA_CA_CERTS is not set", fix
        )
    if not Path(extra).is_file():
        return Check(
            "node trusts the egress CA",
            Status.FAIL,
            f"NODE_EXTRA_CA_CERTS={extra}: no such file",
            fix,
        )
    if not holds(extra, ca_fingerprint(ca)):
        return Check(
            "node trusts the egress CA",
            Status.FAIL,
            f"NODE_EXTRA_CA_CERTS={extra} does not hold the egress CA",
            fix,
        )
    return Check("node trusts the egress CA", Status.OK, f"NODE_EXTRA_CA_CERTS={extra}")
