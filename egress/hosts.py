"""Which destinations the egress proxy treats as LLM APIs, and what it does with them.

Pure data and matching, no mitmproxy: the egress addon asks :meth:`EgressPolicy.classify`
with every name a connection or request carries (the address it is going to, the TLS SNI,
the ``Host`` header) and acts on the answer. Any name that points at the confidential
upstream wins (that path is gated and always re-pinned to the configured origin, so it
can never leak); otherwise any name on the LLM list refuses (or, in audit, logs); only a
connection with no listed name at all is left alone.

Destinations are compared by what they are, not how they are spelled: a client choosing
the address can write the upstream's ``127.0.0.1`` as ``127.1``, ``2130706433``,
``0x7f.1``, ``0177.0.0.1``, ``[::ffff:7f00:1]``, ``LOCALHOST.`` and the socket layer
connects to the same place. :func:`canonical_host` reduces every such spelling to one
form (what ``socket.inet_aton``/``getaddrinfo`` accept, decided by them and by
``ipaddress``, not by a regex of our own), and a name that merely *resolves* to the
upstream's address on its port is the upstream too (the addon resolves, this module
decides on the answers it is given).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import translate
from functools import cached_property
from importlib import resources

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _load_shipped_hosts() -> tuple[str, ...]:
    text = resources.files("teegate.egress").joinpath("llm_hosts.txt").read_text("utf-8")
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return tuple(line for line in lines if line)


# Well-known hosted LLM APIs, with their sources: egress/llm_hosts.txt.
# Editable in proxy.toml (egress.llm_hosts replaces, egress.extra_llm_hosts adds).
DEFAULT_LLM_HOSTS: tuple[str, ...] = _load_shipped_hosts()

_LABEL = r"[a-z0-9*](?:[a-z0-9*\-]*[a-z0-9*])?"
_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
# What inet_aton could read as an IPv4 number (decimal, octal, hex parts); the call decides.
_INET_ATON_CHARS = re.compile(r"[0-9a-fx.]+")


class Verdict(enum.Enum):
    CONFIDENTIAL = "confidential"  # the configured upstream: same path as reverse mode
    REFUSE = "refuse"  # a listed LLM API: 403 provider_not_confidential
    AUDIT = "audit"  # a listed LLM API in audit: forwarded as is, metadata logged
    UNVERIFIED = "unverified"  # could be the upstream, the lookup did not answer in time
    OTHER = "other"  # not an LLM API: tunnelled (TLS) or passed through (plain HTTP)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    host: str  # the name that decided, "host:port"


# Addresses a name resolved to (canonical text), or None: the lookup did not answer in time.
Lookups = Mapping[str, frozenset[str] | None]


def ip_literal(text: str) -> IPAddress | None:
    """The address ``text`` denotes if the socket layer reads it as an IP literal.

    IPv4 in every form ``inet_aton`` accepts (``127.1``, ``0x7f.1``, ``0177.0.0.1``,
    ``2130706433``); IPv6 with or without a zone id; an IPv4-mapped IPv6 address is its
    IPv4 address (a dual-stack socket connects to that).
    """
    ip: IPAddress
    if ":" in text:
        try:
            ip = ipaddress.IPv6Address(text)
        except ValueError:
            return None
    elif _INET_ATON_CHARS.fullmatch(text):  # without it, a name: no exception to pay for
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    else:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(int(ip))
    return ip


def canonical_host(host: str) -> str:
    """The one spelling of a destination host that patterns and the upstream are matched on.

    Case-folded, without surrounding brackets or trailing dots; an IP literal in its
    standard text form (``2130706433`` -> ``127.0.0.1``, ``[::FFFF:7f00:1]`` -> ``127.0.0.1``,
    ``fe80::1%eth0`` -> ``fe80::1``); ``localhost`` and ``*.localhost`` -> ``127.0.0.1``
    (RFC 6761: they are loopback, and are resolved so). Anything else is a name.
    """
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.rstrip(".")
    if ":" in h:
        h = h.split("%", 1)[0]  # an IPv6 zone id ("%eth0", URL-encoded "%25eth0")
    ip = ip_literal(h)
    if ip is not None:
        return str(ip)
    if h == "localhost" or h.endswith(".localhost"):
        return "127.0.0.1"
    return h


def is_local(ip: IPAddress) -> bool:
    """Loopback, or unspecified (on Linux a connection to 0.0.0.0 or :: reaches this host)."""
    return ip.is_loopback or ip.is_unspecified


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPattern:
    """``name``, ``name:port``, ``[v6]:port`` or a glob such as ``*.openai.azure.com``.

    ``*`` matches any run of characters (dots included); without a port every port matches.
    """

    host: str
    port: int | None
    text: str

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        raw = text.strip()
        host, port = raw, None
        if raw.startswith("["):
            end = raw.find("]")
            if end < 0:
                raise ValueError(f"{text!r}: unbalanced '['")
            host, rest = raw[1:end], raw[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"{text!r}: expected ':port' after ']'")
                port = _port(text, rest[1:])
            if not _is_ip(host):
                raise ValueError(f"{text!r}: not an IPv6 address in brackets")
        elif raw.count(":") == 1:
            host, port_text = raw.split(":")
            port = _port(text, port_text)
        host = host.strip().lower().rstrip(".") if "*" in host else canonical_host(host)
        if not (_is_ip(host) or _NAME.match(host)) or host.strip("*.") == "":
            raise ValueError(f"{text!r}: not a host name, IP address or host glob")
        return cls(host, port, text.strip())

    def matches(self, host: str, port: int) -> bool:
        """``host``: canonical (:func:`canonical_host`)."""
        if self.port is not None and self.port != port:
            return False
        if "*" in self.host:
            return self._glob.match(host) is not None
        return host == self.host

    @cached_property
    def _glob(self) -> re.Pattern[str]:
        return re.compile(translate(self.host))


def _port(text: str, value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{text!r}: bad port")
    return int(value)


@dataclass(frozen=True)
class Upstream:
    """The confidential upstream's host and port.

    An IP address (``localhost`` is one) is identified by address *and* port: other
    services share the address (in tests, a second sandbox on 127.0.0.1). When it is a
    loopback address, every local address on its port is the upstream too (127.0.0.2,
    ::1 and 0.0.0.0 reach the same machine, and a server bound to a wildcard answers on
    all of them). A DNS name is identified by name on any port: a request to it on
    another port or over plain HTTP still takes the gated path, which sends it to the
    configured origin and nowhere else, instead of passing the client's gateway key
    through to some other port. Another name, or an address, is the upstream on its port
    when the addresses behind it meet the upstream's (:meth:`EgressPolicy.classify`).
    """

    host: str
    port: int

    @cached_property
    def ip(self) -> IPAddress | None:
        return ip_literal(self.host)

    def matches(self, host: str, port: int) -> bool:
        """By spelling alone (``host`` canonical): no lookup needed."""
        up = self.ip
        if up is None:
            return host == self.host
        if port != self.port:
            return False
        ip = ip_literal(host)
        return ip is not None and (ip == up or (is_local(ip) and is_local(up)))

    def meets(self, addresses: Iterable[str], upstream_addresses: Iterable[str]) -> bool:
        """Whether a destination on the upstream's port behind ``addresses`` reaches it."""
        mine = {ip for a in upstream_addresses if (ip := ip_literal(a)) is not None}
        for a in addresses:
            ip = ip_literal(a)
            if ip is not None and (ip in mine or (is_local(ip) and any(map(is_local, mine)))):
                return True
        return False


class EgressPolicy:
    def __init__(
        self, upstream: Upstream, llm_hosts: Iterable[str], audit_hosts: Iterable[str] = ()
    ) -> None:
        self.upstream = Upstream(canonical_host(upstream.host), upstream.port)
        self.listed = tuple(HostPattern.parse(p) for p in llm_hosts)
        self.audit = tuple(HostPattern.parse(p) for p in audit_hosts)
        # Plain names on every port are a set lookup; the rest (globs, ports) are tried in turn.
        anyport = [p for p in self.listed if p.port is None]
        self._names = {p.host for p in anyport if "*" not in p.host}
        globs = [translate(p.host) for p in anyport if "*" in p.host]
        self._globs = re.compile("|".join(globs)) if globs else None
        self._others = tuple(p for p in self.listed if p.port is not None)
        listed_texts = {(p.host, p.port) for p in self.listed}
        for a in self.audit:
            if (a.host, a.port) not in listed_texts:
                raise ValueError(f"audit host {a.text!r} is not on the LLM host list")

    def lookups(self, names: Sequence[tuple[str, int]]) -> set[str]:
        """The names :meth:`classify` needs resolved to decide ``names`` (canonical).

        Only when the spelling alone would let the request out ungated (to an unlisted
        or an audit host) and a destination is on the upstream's port: then its name, and
        the upstream's own name if it is not an address.
        """
        hosts = _canonical(names)
        if self._by_spelling(hosts).verdict not in (Verdict.OTHER, Verdict.AUDIT):
            return set()
        on_port = [h for h, p in hosts if p == self.upstream.port]
        need = {h for h in on_port if ip_literal(h) is None}
        if on_port and self.upstream.ip is None:
            need.add(self.upstream.host)
        return need

    def classify(
        self, names: Sequence[tuple[str, int]], resolved: Lookups | None = None
    ) -> Decision:
        """Decide for a connection or request reachable under any of ``names``.

        ``resolved``: the answers to :meth:`lookups`. A name without addresses there (no
        answer in time, no address at all, or not asked) makes the decision UNVERIFIED,
        never OTHER: letting it out would have mitmproxy look the name up again to
        connect, and that answer could be the upstream's.
        """
        hosts = _canonical(names)
        decision = self._by_spelling(hosts)
        if decision.verdict not in (Verdict.OTHER, Verdict.AUDIT):
            return decision
        resolved = resolved or {}
        up = self.upstream
        mine = frozenset({up.host}) if up.ip is not None else resolved.get(up.host)
        unsure = None
        for host, port in hosts:
            if port != up.port:
                continue
            theirs = frozenset({host}) if ip_literal(host) is not None else resolved.get(host)
            if mine and theirs:
                if up.meets(theirs, mine):
                    return Decision(Verdict.CONFIDENTIAL, _fmt(host, port))
            elif unsure is None:
                unsure = Decision(Verdict.UNVERIFIED, _fmt(host, port))
        return unsure or decision

    def _by_spelling(self, hosts: list[tuple[str, int]]) -> Decision:
        for host, port in hosts:
            if self.upstream.matches(host, port):
                return Decision(Verdict.CONFIDENTIAL, _fmt(host, port))
        listed = [(h, p) for h, p in hosts if self._is_listed(h, p)]
        if listed:
            # Audit only if every listed name is in audit: a name that is blocked wins.
            for host, port in listed:
                if not any(pat.matches(host, port) for pat in self.audit):
                    return Decision(Verdict.REFUSE, _fmt(host, port))
            return Decision(Verdict.AUDIT, _fmt(*listed[0]))
        first = hosts[0] if hosts else ("", 0)
        return Decision(Verdict.OTHER, _fmt(*first))

    def _is_listed(self, host: str, port: int) -> bool:
        if host in self._names or (self._globs and self._globs.match(host)):
            return True
        return any(pat.matches(host, port) for pat in self._others)


def _canonical(names: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    hosts = ((canonical_host(h), p) for h, p in names if h)
    return [(h, p) for h, p in hosts if h]


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
