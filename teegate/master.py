"""The embedded mitmproxy, with only the built-in addons the gateway uses.

mitmproxy calls every hook of every flow on every addon in its chain (and once more as an
``update`` hook), whether the addon cares or not. ``DumpMaster`` mounts some 35 built-ins:
replay, map local/remote, header and body rewriting, sticky cookies, HAR export, the onboarding
web app and more, none of which the gateway configures. Mounting only the ones it uses, and
calling each hook only on the addons that define it (:class:`HookIndex`), took the gateway's
CPU per small request at 8 concurrent connections from ~2.6 ms to ~1.5 ms, the same as plain
mitmdump's (docs/bench.md). Leaving the built-ins out also leaves out code that could answer or
rewrite a request beside the addon chain (the onboarding app answers ``http://mitm.it`` on a
forward proxy).
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, certs, exceptions, hooks, master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    dns_resolver,
    errorcheck,
    next_layer,
    proxyserver,
    strip_dns_https_records,
    termlog,
    tlsconfig,
    update_alt_svc,
)


class GatewayMaster(master.Master):
    """A mitmproxy master with the proxy core and TLS, and none of the user-facing features."""

    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts, with_termlog=False)  # the flow dumper is never mounted
        self.addons = HookIndex(self)
        self._termlog_addon = termlog.TermLog()
        self.addons.add(self._termlog_addon)
        self.addons.add(
            core.Core(),
            block.Block(),  # block_global / block_private, as mitmdump has them
            strip_dns_https_records.StripDnsHttpsRecords(),
            disable_h2c.DisableH2C(),
            proxyserver.Proxyserver(),
            dns_resolver.DnsResolver(),
            next_layer.NextLayer(),
            TlsConfig(),
            update_alt_svc.UpdateAltSvc(),  # reverse mode: Alt-Svc names the gateway, not upstream
            errorcheck.ErrorCheck(),  # an error logged during start-up stops the start
            FreezeStartupObjects(),
        )


class TlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TLS addon, naming in each certificate it makes only the host asked for.

    For a client that sends no SNI (it connected to an address), mitmproxy also names the
    address the client reached the proxy on. The egress CA permits only the intercepted
    hosts (addons/egress_ca.py), so that extra name would make clients reject the
    certificate; the CONNECT target is named instead.
    """

    def get_cert(self, conn_context: Any) -> certs.CertStoreEntry:
        client, server = conn_context.client, conn_context.server
        if client.sni or not server.address:
            return super().get_cert(conn_context)
        client.sni = server.address[0]  # read only by the call below, which does not await
        try:
            return super().get_cert(conn_context)
        finally:
            client.sni = None


class FreezeStartupObjects:
    """Moves everything alive once the proxy runs out of the garbage collector's sight.

    Why: the gateway imports far more than plain mitmdump (pydantic, structlog, dcap-qvl, the
    catalog and ledger), and CPython's full collection walks every tracked object, in the event
    loop's thread. Under 100 concurrent streams, two full collections in 600 streams took 124 ms
    (up to 74 ms each), and every stream in flight stalled with them; frozen, one took 16 ms.
    Modules, classes and configuration made at start-up live for the whole process, so after
    one collection they are frozen (:func:`gc.freeze`): later collections only walk what
    requests create. Nothing frozen is ever freed, which is what start-up objects do anyway.
    """

    def running(self) -> None:
        gc.collect()
        gc.freeze()


class HookIndex(addonmanager.AddonManager):
    """mitmproxy's addon manager, calling each hook only on the addons that define it.

    The stock manager walks the whole chain for every hook of every flow, entering an
    exception guard for each addon, and follows every flow hook with an ``update`` hook that no
    addon here implements. This one remembers, per hook name, which addons implement it (the
    index is dropped whenever the chain changes) and computes the hook's arguments once.
    Order, the per-addon exception guard and ``AddonHalt`` behave as before.
    """

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._index: dict[str, list[list[Callable[..., Any]]]] = {}

    def clear(self) -> None:
        super().clear()
        self._index.clear()

    def add(self, *addons: Any) -> None:
        self._index.clear()
        super().add(*addons)
        self._index.clear()

    def remove(self, addon: Any) -> None:
        self._index.clear()
        super().remove(addon)
        self._index.clear()

    def _implementers(self, event: hooks.Hook) -> list[list[Callable[..., Any]]]:
        found = self._index.get(event.name)
        if found is None:
            found = [
                funcs
                for root in self.chain
                if (funcs := [func for _, func in self._iter_hooks(root, event)])
            ]
            self._index[event.name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        implementers = self._implementers(event)
        if not implementers:
            return
        args = event.args()
        for funcs in implementers:
            try:
                with addonmanager.safecall():
                    for func in funcs:
                        res = func(*args)
                        if res is not None and inspect.isawaitable(res):
                            await res
            except exceptions.AddonHalt:
                return
