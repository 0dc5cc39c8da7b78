"""Which destinations the egress proxy treats as LLM APIs, and what it does with them.

Pure data and matching, no mitmproxy: the egress addon asks :meth:`EgressPolicy.classify`
with every name a connection or request carries (the address it is going to, the TLS SNI,
the ``Host`` header) and acts on the answer. Any name that points at the confidential
upstream wins (that path is gated and always re-pinned to the configured origin, so it
can never leak); otherwise any name on the LLM list refuses (or, in audit, logs); only a
connection with no listed name at all is left alone.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

# Well-known hosted LLM APIs. Prompts to these leave for hardware nobody attested.
# Editable in proxy.toml (egress.llm_hosts replaces, egress.extra_llm_hosts adds).
DEFAULT_LLM_HOSTS: tuple[str, ...] = (
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "*-aiplatform.googleapis.com",
    "*.openai.azure.com",
    "*.services.ai.azure.com",
    "bedrock-runtime.*.amazonaws.com",
    "api.mistral.ai",
    "api.deepseek.com",
    "openrouter.ai",
    "api.together.xyz",
    "api.groq.com",
    "api.x.ai",
    "api.cohere.com",
    "api.cohere.ai",
    "api.fireworks.ai",
    "api.perplexity.ai",
    "api.cerebras.ai",
    "api.deepinfra.com",
    "router.huggingface.co",
    "api-inference.huggingface.co",
)

_LABEL = r"[a-z0-9*](?:[a-z0-9*\-]*[a-z0-9*])?"
_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


class Verdict(enum.Enum):
    CONFIDENTIAL = "confidential"  # the configured upstream: same path as reverse mode
    REFUSE = "refuse"  # a listed LLM API: 403 provider_not_confidential
    AUDIT = "audit"  # a listed LLM API in audit: forwarded as is, metadata logged
    OTHER = "other"  # not an LLM API: tunnelled (TLS) or passed through (plain HTTP)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    host: str  # the name that decided, "host:port"


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets: the form patterns are matched against."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


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
        host = normalize_host(host)
        if not (_is_ip(host) or _NAME.match(host)) or host.strip("*.") == "":
            raise ValueError(f"{text!r}: not a host name, IP address or host glob")
        return cls(host, port, text.strip())

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if "*" in self.host:
            return fnmatchcase(host, self.host)
        return host == self.host


def _port(text: str, value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{text!r}: bad port")
    return int(value)


@dataclass(frozen=True)
class Upstream:
    """The confidential upstream's host and port.

    An IP address or ``localhost`` is identified by host *and* port: other services share
    the address (in tests, a second sandbox on 127.0.0.1). A DNS name is identified on any
    port: a request to it on another port or over plain HTTP still takes the gated path,
    which sends it to the configured origin and nowhere else, instead of passing the
    client's gateway key through to some other port.
    """

    host: str
    port: int

    def matches(self, host: str, port: int) -> bool:
        if host != self.host:
            return False
        return port == self.port or not (_is_ip(host) or host == "localhost")


class EgressPolicy:
    def __init__(
        self, upstream: Upstream, llm_hosts: Iterable[str], audit_hosts: Iterable[str] = ()
    ) -> None:
        self.upstream = Upstream(normalize_host(upstream.host), upstream.port)
        self.listed = tuple(HostPattern.parse(p) for p in llm_hosts)
        self.audit = tuple(HostPattern.parse(p) for p in audit_hosts)
        listed_texts = {(p.host, p.port) for p in self.listed}
        for a in self.audit:
            if (a.host, a.port) not in listed_texts:
                raise ValueError(f"audit host {a.text!r} is not on the LLM host list")

    def classify(self, names: Sequence[tuple[str, int]]) -> Decision:
        """Decide for a connection or request reachable under any of ``names``."""
        hosts = [(normalize_host(h), p) for h, p in names if h]
        for host, port in hosts:
            if self.upstream.matches(host, port):
                return Decision(Verdict.CONFIDENTIAL, _fmt(host, port))
        listed = [(h, p) for h, p in hosts if any(pat.matches(h, p) for pat in self.listed)]
        if listed:
            # Audit only if every listed name is in audit: a name that is blocked wins.
            for host, port in listed:
                if not any(pat.matches(host, port) for pat in self.audit):
                    return Decision(Verdict.REFUSE, _fmt(host, port))
            return Decision(Verdict.AUDIT, _fmt(*listed[0]))
        first = hosts[0] if hosts else ("", 0)
        return Decision(Verdict.OTHER, _fmt(*first))


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
