"""Egress mode: the forward-proxy listener an enterprise points ``HTTPS_PROXY`` at.

Only flows that arrived on the regular (forward) listener are touched; the reverse
listener's flows pass through untouched, so nothing decided here can open a path around
the gate. mitmproxy's ``ignore_hosts``/``allow_hosts`` would apply to *every* listener
(and turn the reverse one into a raw tunnel), so they are refused at start and each
decision is made here, per connection and per mode:

* TLS (``tls_clienthello``): a connection to the confidential upstream or a listed LLM
  host is decrypted with the gateway's CA; every other one is tunnelled untouched, its
  own certificate reaching the client.
* HTTP (``requestheaders``, before any body byte is read or sent): the upstream's requests
  are pinned to the configured origin and continue down the same path as reverse mode
  (router, validation, gate, key swap, billing); a listed host's are refused with ``403
  provider_not_confidential`` (or, for an ``audit`` host, forwarded as is and logged);
  anything else passes through, streamed.
* Neither TLS nor HTTP (``next_layer``): raw TCP to a listed host is parsed as HTTP
  instead of relayed, so it is refused too; raw TCP elsewhere is relayed.

Destinations are matched on what they are (:func:`teegate.egress.hosts.canonical_host`):
``127.1``, ``2130706433`` or ``[::ffff:127.0.0.1]`` are the upstream at 127.0.0.1, and
so is any name that resolves to the upstream's address, on its port. Names are resolved
here, off the event loop (``loop.getaddrinfo``), only when the spelling alone would let
a connection out ungated on the upstream's port; answers are cached for a minute. A
lookup that does not answer in time, or answers with no address, is doubt: the
connection is decrypted rather than tunnelled and its requests refused with ``504
destination_unverified`` (a tunnel would look the name up again to connect, and carry the
client's gateway key to wherever it points by then). A
tunnel that was checked this way is pinned to the address that was checked, so a name
that resolves differently a moment later (DNS rebinding) cannot move it to the upstream.

A hook that fails intercepts rather than tunnels (``tls_clienthello``) and refuses rather
than forwards (``requestheaders``): doubt never sends a prompt to an unlisted path.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import structlog
from cachetools import TTLCache
from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.net.http import url
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.http import HTTPMode

from teegate.addons import flowstate
from teegate.addons.errors import GatewayError, guarded, refuse
from teegate.addons.flowstate import Route
from teegate.addons.response_guard import guarded_response
from teegate.egress.hosts import (
    Decision,
    EgressPolicy,
    Upstream,
    Verdict,
    canonical_host,
    ip_literal,
)

if TYPE_CHECKING:
    from teegate.addons.metrics import Meter
    from teegate.config import EgressSettings, UpstreamSettings

log = structlog.get_logger("teegate.access")

_HOP_BY_HOP_PROXY = ("proxy-authorization", "proxy-connection")

RESOLVE_TIMEOUT_S = 2.0  # how long a connection waits for a name's addresses
RESOLVE_CACHE_TTL_S = 60.0
RESOLVE_CACHE_SIZE = 4096
RESOLVE_MAX_PENDING = 256  # lookups in flight at once; beyond that, doubt at once

GetAddrInfo = Callable[[str], Awaitable[list[tuple]]]


class Resolver:
    """Addresses behind a name: off the event loop, cached, bounded in time and number.

    ``None`` means "no answer in time" (or too many lookups in flight); an empty set, no
    address (a name that does not exist is remembered like any answer, a temporary
    failure is not). The policy treats both as doubt. A lookup that times out keeps
    running (a thread cannot be cancelled) and fills the cache when it ends; concurrent
    askers of one name share it.
    """

    def __init__(
        self,
        timeout: float = RESOLVE_TIMEOUT_S,
        ttl: float = RESOLVE_CACHE_TTL_S,
        getaddrinfo: GetAddrInfo | None = None,
    ) -> None:
        self.timeout = timeout
        self._cache: TTLCache[str, frozenset[str]] = TTLCache(RESOLVE_CACHE_SIZE, ttl)
        self._pending: dict[str, asyncio.Future[frozenset[str]]] = {}
        self._getaddrinfo = getaddrinfo or _getaddrinfo

    async def resolve(self, names: set[str]) -> dict[str, frozenset[str] | None]:
        found = await asyncio.gather(*(self.lookup(n) for n in names))
        return dict(zip(names, found, strict=True))

    async def lookup(self, name: str) -> frozenset[str] | None:
        if (cached := self._cache.get(name)) is not None:
            return cached
        task = self._pending.get(name)
        if task is None:
            if len(self._pending) >= RESOLVE_MAX_PENDING:
                return None
            task = asyncio.ensure_future(self._resolve(name))
            self._pending[name] = task
            task.add_done_callback(lambda _: self._pending.pop(name, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.timeout)
        except TimeoutError:
            return None

    async def _resolve(self, name: str) -> frozenset[str]:
        try:
            infos = await self._getaddrinfo(name)
        except socket.gaierror as e:
            if e.errno in _NO_SUCH_NAME:
                self._cache[name] = frozenset()
            return frozenset()  # a temporary failure: no address now, asked again next time
        except (OSError, UnicodeError):
            return frozenset()
        addresses = frozenset(canonical_host(str(info[4][0])) for info in infos)
        self._cache[name] = addresses
        return addresses


_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


async def _getaddrinfo(name: str) -> list[tuple]:
    loop = asyncio.get_running_loop()
    return await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)


def is_egress(mode_type_name: str) -> bool:
    return mode_type_name == "regular"


def _reverse_address() -> tuple[str, int] | None:
    """The reverse listener's bound address, if mitmproxy is serving one."""
    try:
        servers = ctx.master.addons.get("proxyserver").servers
        for server in servers:
            if server.mode.type_name == "reverse" and server.listen_addrs:
                host, port, *_ = server.listen_addrs[0]
                return str(host), int(port)
    except Exception:
        pass  # no master (unit tests) or no server yet: the configured address stands in
    return None


def provider_not_confidential(host: str, confidential_base_url: str) -> GatewayError:
    return GatewayError(
        403,
        f"{host} is not a confidential-compute provider: this gateway sends prompts only to "
        "hardware-attested (TEE) models, and nothing of this request was forwarded. Use "
        f"the confidential endpoint instead: base_url={confidential_base_url} with your "
        "gateway key.",
        "provider_not_confidential",
        type="permission_error",
    )


def destination_unverified(host: str, timeout: float) -> GatewayError:
    return GatewayError(
        504,
        f"Could not tell whether {host} is the confidential upstream (its name did not "
        f"resolve to an address within {timeout:g} s), so nothing of this request was "
        "forwarded.",
        "destination_unverified",
        type="api_error",
    )


class Egress:
    def __init__(
        self,
        egress: EgressSettings,
        upstream: UpstreamSettings,
        resolver: Resolver | None = None,
        *,
        reverse_listen: str = "",
        meter: Meter | None = None,
    ) -> None:
        self._resolver = resolver or Resolver()
        self._meter = meter
        self._reverse_listen = reverse_listen
        o = upstream.origin_parts
        self._policy = EgressPolicy(
            Upstream(o.host, o.port), egress.all_llm_hosts, egress.audit_hosts
        )
        self._origin = o
        self._base_url = f"{upstream.origin}/v1"

    def configure(self, updated: set[str]) -> None:
        if ctx.options.ignore_hosts or ctx.options.allow_hosts:
            raise exceptions.OptionsError(
                "ignore_hosts/allow_hosts apply to every listener and would tunnel the "
                "reverse listener past the gate; egress decides per connection instead"
            )

    def _confidential_base_url(self, flow: http.HTTPFlow) -> str:
        """Where a refused client should point its base_url: the gateway's own reverse listener.

        Not the upstream's URL: with the ``NO_PROXY`` docs/egress.md suggests, that call skips
        this proxy and fails at the upstream with its own 401 (it never saw the gateway key).
        The address is the one bound (a configured port 0 is a real port by now); a wildcard
        host is replaced by the address the client reached this egress listener on. With the
        reverse listener off, the upstream URL through this proxy is the only way in.
        """
        bound = _reverse_address()
        if bound is None and self._reverse_listen:
            host, _, port = self._reverse_listen.rpartition(":")
            bound = (host.strip("[]"), int(port))
        if bound is None:
            return f"{self._base_url} (through this proxy)"
        host, port = bound
        if host in ("", "0.0.0.0", "::"):
            host = str(flow.client_conn.sockname[0]) if flow.client_conn.sockname else "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/v1"

    # -- per connection ---------------------------------------------------------------

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        context = data.context
        if not is_egress(context.client.proxy_mode.type_name) or not context.server.address:
            return
        host, port, *_ = context.server.address
        names = [(host, port)]
        if data.client_hello.sni:
            names.append((data.client_hello.sni, port))
        decision, resolved = await self._decide(names)
        if decision.verdict is Verdict.OTHER:
            _pin(context.server, resolved)
            data.ignore_connection = True
            self._count(decision, "tunnel")
            log.info("tunnel", mode="egress", host=decision.host, decision="tunnel")

    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        chosen = nextlayer.layer
        context = nextlayer.context
        if not isinstance(chosen, layers.TCPLayer) or chosen.flow is None:
            return  # not raw TCP, or a tunnel this addon already chose
        if not is_egress(context.client.proxy_mode.type_name) or not context.server.address:
            return
        try:
            host, port, *_ = context.server.address
            names = [(host, port)]
            if context.client.sni:
                names.append((context.client.sni, port))
            decision, resolved = await self._decide(names)
            relay = decision.verdict is Verdict.OTHER
            if relay:
                _pin(context.server, resolved)
                self._count(decision, "tunnel")
        except Exception:  # mitmproxy would relay after logging: decide "not raw" instead
            relay = False
        if not relay:
            # Parsed as HTTP, non-HTTP bytes are answered with an error; HTTP meets the policy.
            nextlayer.layer = layers.HttpLayer(context, HTTPMode.transparent)

    # -- per request ------------------------------------------------------------------

    @guarded
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not is_egress(flow.client_conn.proxy_mode.type_name) or flow.response:
            return
        r = flow.request
        names = [(r.host, r.port)]
        if r.host_header:
            h, p = url.parse_authority(r.host_header, check=False)
            names.append((h, p or url.default_port(r.scheme) or r.port))
        if flow.client_conn.sni:
            names.append((flow.client_conn.sni, r.port))
        decision, _ = await self._decide(names)
        flowstate.set_egress_verdict(flow, decision.verdict.value)
        self._count(decision, "request")
        if decision.verdict is Verdict.CONFIDENTIAL:
            self._pin_to_upstream(r)
        elif decision.verdict is Verdict.REFUSE:
            flowstate.set_route(flow, Route.LOCAL)
            hint = self._confidential_base_url(flow)
            refuse(flow, provider_not_confidential(_shown(decision.host), hint))
        elif decision.verdict is Verdict.UNVERIFIED:
            flowstate.set_route(flow, Route.LOCAL)
            refuse(flow, destination_unverified(decision.host, self._resolver.timeout))
        else:
            flowstate.set_route(flow, Route.PASSTHROUGH)
            for name in _HOP_BY_HOP_PROXY:
                r.headers.pop(name, None)
            if decision.verdict is Verdict.AUDIT:
                log.warning(
                    "egress_audit",
                    mode="egress",
                    host=decision.host,
                    method=r.method,
                    path=r.path.split("?", 1)[0][:200],
                )
            else:
                r.stream = True  # not ours to read: relay without buffering

    @guarded_response
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flowstate.route(flow) == Route.PASSTHROUGH:
            flow.response.stream = True

    def _count(self, decision: Decision, unit: str) -> None:
        if self._meter is not None:
            self._meter.egress_decision(decision.verdict.value, unit)

    async def _decide(
        self, names: list[tuple[str, int]]
    ) -> tuple[Decision, Mapping[str, frozenset[str] | None]]:
        resolved = await self._resolver.resolve(self._policy.lookups(names))
        return self._policy.classify(names, resolved), resolved

    def _pin_to_upstream(self, r: http.Request) -> None:
        """Make the flow look exactly like one from the reverse listener."""
        o = self._origin
        r.scheme, r.host, r.port = o.scheme, o.host, o.port
        r.host_header = o.host_header


def _pin(server, resolved: Mapping[str, frozenset[str] | None]) -> None:
    """Connect a checked tunnel to an address that was checked, not to a fresh lookup."""
    host, port, *_ = server.address
    addresses = resolved.get(canonical_host(host))
    if not addresses or server.connected:
        return
    ips = sorted((ip for a in addresses if (ip := ip_literal(a))), key=lambda ip: ip.version)
    if ips:
        server.address = (str(ips[0]), port)


def _shown(host_port: str) -> str:
    host, _, port = host_port.rpartition(":")
    return host if port in ("443", "80") else host_port
