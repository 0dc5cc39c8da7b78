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

A hook that fails intercepts rather than tunnels (``tls_clienthello``) and refuses rather
than forwards (``requestheaders``): doubt never sends a prompt to an unlisted path.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

import structlog
from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.net.http import url
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.http import HTTPMode

from addons.egress_hosts import (
    DEFAULT_LLM_HOSTS,
    Decision,
    EgressPolicy,
    Upstream,
    Verdict,
)
from addons.errors import GatewayError, guarded, refuse

log = structlog.get_logger("teegate.access")

EGRESS = "teegate.egress"  # the Verdict value, on every flow from the egress listener
EGRESS_HOST = "teegate.egress_host"  # the "host:port" that decided it
_HOP_BY_HOP_PROXY = ("proxy-authorization", "proxy-connection")


def is_egress(mode_type_name: str) -> bool:
    return mode_type_name == "regular"


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


class Egress:
    def __init__(self) -> None:
        self._policy: EgressPolicy | None = None
        self._origin: tuple[str, str, int] | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "teegate_egress_llm_hosts",
            Sequence[str],
            list(DEFAULT_LLM_HOSTS),
            "LLM API hosts the egress listener intercepts and refuses (name, name:port or glob).",
        )
        loader.add_option(
            "teegate_egress_audit_hosts",
            Sequence[str],
            [],
            "Listed hosts forwarded as is, with a metadata-only log line, instead of refused.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if opts.ignore_hosts or opts.allow_hosts:
            raise exceptions.OptionsError(
                "ignore_hosts/allow_hosts apply to every listener and would tunnel the "
                "reverse listener past the gate; egress decides per connection instead"
            )
        parts = urlsplit(opts.teegate_upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise exceptions.OptionsError("teegate_upstream must be an http(s) origin")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            self._policy = EgressPolicy(
                Upstream(parts.hostname, port),
                opts.teegate_egress_llm_hosts,
                opts.teegate_egress_audit_hosts,
            )
        except ValueError as e:
            raise exceptions.OptionsError(f"egress hosts: {e}") from None
        self._origin = (parts.scheme, parts.hostname, port)
        self._base_url = f"{parts.scheme}://{parts.netloc}/v1"

    # -- per connection ---------------------------------------------------------------

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        context = data.context
        if not is_egress(context.client.proxy_mode.type_name) or not context.server.address:
            return
        host, port, *_ = context.server.address
        names = [(host, port)]
        if data.client_hello.sni:
            names.append((data.client_hello.sni, port))
        decision = self._decide(names)
        if decision.verdict is Verdict.OTHER:
            data.ignore_connection = True
            log.info("tunnel", mode="egress", host=decision.host, decision="tunnel")

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
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
            relay = self._decide(names).verdict is Verdict.OTHER
        except Exception:  # mitmproxy would relay after logging: decide "not raw" instead
            relay = False
        if not relay:
            # Parsed as HTTP, non-HTTP bytes are answered with an error; HTTP meets the policy.
            nextlayer.layer = layers.HttpLayer(context, HTTPMode.transparent)

    # -- per request ------------------------------------------------------------------

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not is_egress(flow.client_conn.proxy_mode.type_name) or flow.response:
            return
        r = flow.request
        names = [(r.host, r.port)]
        if r.host_header:
            h, p = url.parse_authority(r.host_header, check=False)
            names.append((h, p or url.default_port(r.scheme) or r.port))
        if flow.client_conn.sni:
            names.append((flow.client_conn.sni, r.port))
        decision = self._decide(names)
        flow.metadata[EGRESS] = decision.verdict.value
        flow.metadata[EGRESS_HOST] = decision.host
        if decision.verdict is Verdict.CONFIDENTIAL:
            self._pin_to_upstream(r)
        elif decision.verdict is Verdict.REFUSE:
            flow.metadata["teegate.route"] = "local"
            refuse(flow, provider_not_confidential(_shown(decision.host), self._base_url))
        else:
            flow.metadata["teegate.route"] = "passthrough"
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

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.metadata.get("teegate.route") == "passthrough":
            flow.response.stream = True

    def _decide(self, names: list[tuple[str, int]]) -> Decision:
        if self._policy is None:
            raise RuntimeError("egress policy not configured")
        return self._policy.classify(names)

    def _pin_to_upstream(self, r: http.Request) -> None:
        """Make the flow look exactly like one from the reverse listener."""
        assert self._origin is not None
        scheme, host, port = self._origin
        r.scheme, r.host, r.port = scheme, host, port
        r.host_header = url.hostport(scheme, host, port)


def _shown(host_port: str) -> str:
    host, _, port = host_port.rpartition(":")
    return host if port in ("443", "80") else host_port
