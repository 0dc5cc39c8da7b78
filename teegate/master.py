"""The embedded mitmproxy, with only the built-in addons the gateway uses.

mitmproxy calls every hook of every flow on every addon in its chain (and once more as an
``update`` hook), whether the addon cares or not. ``DumpMaster`` mounts some 35 built-ins:
replay, map local/remote, header and body rewriting, sticky cookies, HAR export, the onboarding
web app and more, none of which the gateway configures. Visiting them cost the proxy about
0.5 ms of CPU per request, on a path whose whole budget over plain mitmproxy is 1 ms (see
docs/bench.md). Leaving them out also leaves out code that could answer or rewrite a request
beside the addon chain (the onboarding app answers ``http://mitm.it`` on a forward proxy).
"""

from __future__ import annotations

from mitmproxy import master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    dns_resolver,
    errorcheck,
    next_layer,
    proxyserver,
    strip_dns_https_records,
    tlsconfig,
    update_alt_svc,
)


class GatewayMaster(master.Master):
    """A mitmproxy master with the proxy core and TLS, and none of the user-facing features."""

    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts, with_termlog=True)  # the flow dumper is never mounted
        self.addons.add(
            core.Core(),
            block.Block(),  # block_global / block_private, as mitmdump has them
            strip_dns_https_records.StripDnsHttpsRecords(),
            disable_h2c.DisableH2C(),
            proxyserver.Proxyserver(),
            dns_resolver.DnsResolver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            update_alt_svc.UpdateAltSvc(),  # reverse mode: Alt-Svc names the gateway, not upstream
            errorcheck.ErrorCheck(),  # an error logged during start-up stops the start
        )
