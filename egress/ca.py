"""The gateway's own certificate authority, for intercepting TLS to LLM API hosts.

mitmproxy reads its CA from ``<confdir>/mitmproxy-ca.pem`` and creates one named
"mitmproxy" if the file is missing. We create it first, in the same layout, so the
certificate an operator installs in trust stores says what it is ("teegate egress CA").
The private key file is owner-only (mitmproxy writes it under a 0o77 umask) and the
directory is created 0700; a lock keeps ``teegate ca path`` and a starting gateway from
creating two different CAs at once.

Why name constraints: every machine that trusts this CA would accept any certificate it
signs, for any site. The egress listener only ever intercepts the confidential upstream
and the listed LLM API hosts, so the CA is made with a critical ``nameConstraints``
extension permitting exactly those names (a glob such as ``*.openai.azure.com`` permits
``openai.azure.com`` and its subdomains; an address, that address): a copy of its key
cannot impersonate a bank. A CA made earlier is checked against the configured hosts at
every start: one that does not cover them refuses the start (the certificates it would
sign could not be trusted anyway), one without constraints is used with a warning.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from mitmproxy import certs
from mitmproxy.options import CONF_BASENAME, KEY_SIZE

from teegate.egress.hosts import HostPattern, ip_literal

log = structlog.get_logger("teegate")

CA_ORGANIZATION = "teegate"
CA_COMMON_NAME = "teegate egress CA"


class CAError(Exception):
    """The CA in the configuration directory cannot serve this configuration."""


def ca_cert_path(confdir: Path) -> Path:
    """The public certificate clients must trust (PEM)."""
    return Path(confdir).expanduser() / f"{CONF_BASENAME}-ca-cert.pem"


def ensure_ca(confdir: Path, hosts: Iterable[str] = ()) -> Path:
    """Create the CA in ``confdir`` unless one is there; return the certificate's path.

    ``hosts``: every host pattern the egress listener may intercept. A new CA permits only
    those; an existing one must cover them (:class:`CAError` names what it does not).
    """
    directory = Path(confdir).expanduser()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    wanted = name_constraints(hosts)
    with open(directory / ".ca.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / f"{CONF_BASENAME}-ca.pem").exists():
            _create(directory, wanted)
    cert = ca_cert_path(directory)
    if not cert.exists():
        # A key without its certificate file: someone deleted half the CA. Refuse rather
        # than hand out a path that does not exist.
        raise FileNotFoundError(f"{cert} is missing but {directory} holds a CA key")
    os.chmod(directory / f"{CONF_BASENAME}-ca.pem", 0o600)
    _check(x509.load_pem_x509_certificate(cert.read_bytes()), wanted, cert)
    return cert


def name_constraints(hosts: Iterable[str]) -> x509.NameConstraints | None:
    """Permitted subtrees covering ``hosts`` (host patterns), or None if none can.

    A glob permits the whole-label suffix after its last ``*`` (``api*.example.com``
    permits ``example.com``); a glob with no such suffix cannot be constrained.
    """
    subtrees: dict[str, x509.GeneralName] = {}
    for text in hosts:
        host = HostPattern.parse(text).host
        spelled = text.strip().lower().rstrip(".")
        if spelled != host and "*" not in spelled and ip_literal(spelled) is None:
            # "localhost" is matched as 127.0.0.1, but certificates for it name "localhost".
            subtrees[spelled] = x509.DNSName(spelled)
        try:
            net = ipaddress.ip_network(host)
        except ValueError:
            pass
        else:
            subtrees[str(net)] = x509.IPAddress(net)
            # mitmproxy's certificate for an address names it in the subject CN too, and
            # OpenSSL holds a CN that looks like a host name against the DNS subtrees.
            subtrees[host] = x509.DNSName(host)
            continue
        if "*" in host:
            tail = host[host.rindex("*") + 1 :]
            host = tail[tail.find(".") + 1 :] if "." in tail else ""
            if not host:
                return None
        subtrees[host] = x509.DNSName(host)
    if not subtrees:
        return None
    return x509.NameConstraints(permitted_subtrees=list(subtrees.values()), excluded_subtrees=None)


def _create(directory: Path, constraints: x509.NameConstraints | None) -> None:
    """mitmproxy's CA (same key, extensions and files), plus the name constraints."""
    key, ca = certs.create_ca(organization=CA_ORGANIZATION, cn=CA_COMMON_NAME, key_size=KEY_SIZE)
    if constraints is not None:
        builder = (
            x509.CertificateBuilder()
            .subject_name(ca.subject)
            .issuer_name(ca.issuer)
            .public_key(ca.public_key())
            .serial_number(ca.serial_number)
            .not_valid_before(ca.not_valid_before_utc)
            .not_valid_after(ca.not_valid_after_utc)
        )
        for ext in ca.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        ca = builder.add_extension(constraints, critical=True).sign(key, hashes.SHA256())
    pem_cert = ca.public_bytes(serialization.Encoding.PEM)
    with certs.CertStore.umask_secret():
        (directory / f"{CONF_BASENAME}-ca.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            + pem_cert
        )
        (directory / f"{CONF_BASENAME}-ca.p12").write_bytes(
            pkcs12.serialize_key_and_certificates(
                CONF_BASENAME.encode(), key, ca, None, serialization.NoEncryption()
            )
        )
    (directory / f"{CONF_BASENAME}-ca-cert.pem").write_bytes(pem_cert)
    (directory / f"{CONF_BASENAME}-ca-cert.cer").write_bytes(pem_cert)  # for Android


def _check(ca: x509.Certificate, wanted: x509.NameConstraints | None, path: Path) -> None:
    try:
        have = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        log.warning(
            "egress_ca_unconstrained",
            ca=str(path),
            consequence="a copy of its key could sign for any site; remove the CA files to "
            "have a name-constrained one made, then distribute the new certificate",
        )
        return
    permitted = list(have.permitted_subtrees or ())
    needed = list(wanted.permitted_subtrees or ()) if wanted is not None else None
    if needed is None:
        raise CAError(f"{path} is name-constrained, but a configured host glob cannot be")
    missing = [str(n.value) for n in needed if not any(_within(n, p) for p in permitted)]
    if missing:
        raise CAError(
            f"{path} does not permit {', '.join(missing)} (it was made for "
            f"{', '.join(str(p.value) for p in permitted)}); remove the CA files from "
            f"{path.parent} to have one made for the configured hosts, and distribute it"
        )


def _within(name: x509.GeneralName, subtree: x509.GeneralName) -> bool:
    if isinstance(name, x509.DNSName) and isinstance(subtree, x509.DNSName):
        return name.value == subtree.value or name.value.endswith("." + subtree.value)
    if isinstance(name, x509.IPAddress) and isinstance(subtree, x509.IPAddress):
        a, b = name.value, subtree.value
        return a.version == b.version and a.subnet_of(b)  # type: ignore[arg-type]
    return False
