"""Would a client skip the proxy for a host? ``NO_PROXY`` read the way clients read it.

Clients disagree, so a host counts as bypassed when *any* common one would bypass it: an app
in the wrong one would otherwise send its gateway key straight to the upstream (answered 401
by the upstream) or an LLM API's traffic around the gate. What is honoured:

* ``*`` alone: every host (curl, requests, httpx, Node).
* a name, with or without a leading ``.`` or ``*.``: that host and its subdomains (curl,
  httpx, Node); requests also matches a bare suffix (``ai.com`` covers ``openai.com``), and
  so does this.
* ``host:port``: only that port (curl, requests, Node).
* an IP address, or a CIDR block (``10.0.0.0/8``; requests, curl >= 7.86): the addresses in it.
  ``localhost`` and ``127.0.0.1`` are different entries (no client resolves to compare).

Entries are separated by commas (curl also accepts spaces); case does not matter.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

NO_PROXY_VARS = ("no_proxy", "NO_PROXY")


def no_proxy_entries(env: Mapping[str, str]) -> list[str]:
    """Every entry of ``no_proxy`` and ``NO_PROXY`` (clients read one or the other)."""
    entries: list[str] = []
    for name in NO_PROXY_VARS:
        for entry in env.get(name, "").replace(" ", ",").split(","):
            entry = entry.strip().lower()
            if entry and entry not in entries:
                entries.append(entry)
    return entries


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6]:port or [v6]
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def bypassing_entry(host: str, port: int, entries: list[str]) -> str | None:
    """The first entry that makes some client bypass the proxy for ``host:port``, or None."""
    host = host.strip("[]").lower().rstrip(".")
    ip = _ip(host)
    for entry in entries:
        if entry == "*":
            return entry
        name, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if "/" in name:
            try:
                net = ipaddress.ip_network(name, strict=False)
            except ValueError:
                continue
            if ip is not None and ip.version == net.version and ip in net:
                return entry
            continue
        if _ip(name) is not None:
            if ip is not None and ip == _ip(name):
                return entry
            continue
        bare = name.removeprefix("*").lstrip(".").rstrip(".")
        if bare and ip is None and host.endswith(bare):  # requests: any suffix at all
            return entry
    return None
