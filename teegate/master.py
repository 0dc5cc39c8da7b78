"""The embedded mitmproxy, with only the built-in addons the gateway uses.

mitmproxy calls every hook of every flow on every addon in its chain (and once more as an
``update`` hook), whether the addon cares or not. ``DumpMaster`` mounts some 35 built-ins:
replay, map local/remote, header and body rewriting, sticky cookies, HAR export, the onboarding
web app and more, none of which the gateway configures. Mounting only the ones it uses, and
calling each hook only on the addons that define it (:class:`HookIndex`), brings the gateway's
CPU per small request down to plain mitmdump's (measured in docs/bench.md, "What was changed
for speed"). Leaving the built-ins out also leaves out code that could answer or rewrite a
request beside the addon chain (the onboarding app answers ``http://mitm.it`` on a forward
proxy).
"""

from __future__ import annotations

import gc
import inspect
import logging
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import h11
from h11._readers import ChunkedReader
from mitmproxy import addonmanager, certs, connection, exceptions, hooks, http, master, options
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
from mitmproxy.proxy import commands, events, mode_specs
from mitmproxy.proxy.layers.http import HttpStream, RequestEndOfMessage, _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp

from teegate import fastpaths
from teegate.addons.errors import error_category


class GatewayMaster(master.Master):
    """A mitmproxy master with the proxy core and TLS, and none of the user-facing features."""

    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts, with_termlog=False)  # the flow dumper is never mounted
        harden_mitmproxy()
        self.addons = HookIndex(self)
        self._termlog_addon = termlog.TermLog()
        self._termlog_addon.logger.setFormatter(CategoryFormatter(self._termlog_addon.logger))
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
    hosts (egress/ca.py), so that extra name would make clients reject the
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
    loop's thread, stalling every stream in flight for tens of milliseconds (docs/bench.md,
    "Second round"). Modules, classes and configuration made at start-up live for the whole
    process, so after one collection they are frozen (:func:`gc.freeze`): later collections
    only walk what requests create. Nothing frozen is ever freed, which is what start-up
    objects do anyway.
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


# -- narrow changes to mitmproxy, each for a measured failure -----------------------------


def harden_mitmproxy() -> None:
    """Apply the changes below, once, before any listener is configured."""
    if getattr(HttpStream.check_body_size, "_teegate", False):
        return
    HttpStream.check_body_size = _requests_only(HttpStream.check_body_size)
    mode_specs.ReverseMode.__post_init__ = _tcp_only(mode_specs.ReverseMode.__post_init__)
    _http1.ChunkedReader = TrailerKeepingReader  # looked up by name per message
    # Requests only: the server side (upstream answers) reads every streamed chunk through
    # read_body, and the wrapper's generator layer would cost each chunk for nothing there.
    _http1.Http1Server.read_body = _with_trailers(_http1.Http1Connection.read_body)
    _http1.Http1Server.read_headers = _bounded_head(_http1.Http1Server.read_headers)
    fastpaths.install()  # two per-chunk costs of mitmproxy's, results unchanged


MAX_HEAD_BYTES = 64 * 1024


@dataclass
class RequestHeadTooLargeHook(commands.StartHook):
    """A client's request head passed :data:`MAX_HEAD_BYTES`: it gets a 431 and no flow is made.

    Every other refusal is a flow, which the access log and the metrics record; this one is
    refused before mitmproxy has a request to make a flow of, so it is announced as its own
    hook (``request_head_too_large(client)``) for them to record. Nothing of the head is passed
    on: it is the client's bytes.
    """

    client: connection.Client


def _bounded_head(original: Callable[..., Any]) -> Callable[..., Any]:
    """A request's header section is refused with 431 once it passes :data:`MAX_HEAD_BYTES`
    without ending.

    mitmproxy buffers a request head until its blank line, however long ("FIXME: protect
    against header size DoS" in its HTTP/1 server): a client could hold a connection growing
    without bound. 64 KiB is several times what any OpenAI client sends (Node's limit is 16).
    The refusal is announced first (:class:`RequestHeadTooLargeHook`): logged and counted.
    """

    def read_headers(self: Any, event: Any) -> Generator[Any, Any, None]:
        if isinstance(event, events.DataReceived) and len(self.buf) > MAX_HEAD_BYTES:
            head = bytes(self.buf)[: MAX_HEAD_BYTES + 4]
            if b"\r\n\r\n" not in head and b"\n\n" not in head:
                yield RequestHeadTooLargeHook(self.context.client)
                yield commands.SendData(
                    self.conn,
                    _http1.make_error_response(431, "request header fields too large"),
                )
                yield commands.CloseConnection(self.conn)
                self.state = self.done
                return
        yield from original(self, event)

    return read_headers


def _requests_only(check: Callable[..., Any]) -> Callable[..., Any]:
    """``body_size_limit`` for request bodies only.

    mitmproxy checks it while buffering (a larger Content-Length is refused at the headers,
    a chunked body as soon as it passes the limit: 413 to the client), which is the bound a
    request needs before any hook runs. It applies the same limit to buffered *responses*,
    where it would turn the confidential upstream's large answer into a 502; those are the
    upstream's bytes, buffered only when not streamed, and are not limited.
    """

    def check_body_size(self: HttpStream, request: bool) -> Generator[Any, Any, bool]:
        if not request:
            return False
        return (yield from check(self, request))

    check_body_size._teegate = True  # type: ignore[attr-defined]
    return check_body_size


def _tcp_only(post_init: Callable[[Any], None]) -> Callable[[Any], None]:
    """Reverse mode to an ``https://`` upstream listens on TCP only.

    mitmproxy also binds UDP on the same port for HTTP/3 (QUIC), a second protocol stack the
    gateway's guarantees (body limit, framing, error pages) are not tested on; no such
    listener is opened.
    """

    def __post_init__(self: mode_specs.ReverseMode) -> None:
        post_init(self)
        if self.transport_protocol == mode_specs.BOTH:
            self.transport_protocol = mode_specs.TCP  # type: ignore[misc]

    return __post_init__


class TrailerKeepingReader(ChunkedReader):
    """h11's chunked-body reader, handing trailer fields over instead of ending the message
    with them: mitmproxy 12 raises ``NotImplementedError`` on trailers of an HTTP/1 body,
    which crashed the client's connection handler (a traceback quoting the connection).
    """

    trailers: http.Headers | None = None

    def __call__(self, buf: Any) -> Any:
        event = super().__call__(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            self.trailers = http.Headers([(bytes(k), bytes(v)) for k, v in event.headers])
            return h11.EndOfMessage()
        return event


def _with_trailers(original: Callable[..., Any]) -> Callable[..., Any]:
    """Put a request's trailers on the request before its end is announced, as mitmproxy's
    HTTP/2 layer does, so an addon (addons/limits.py) refuses it with a 400. A streamed
    request's trailers are dropped instead (HTTP/1 upstream connections cannot send them)."""

    def read_body(self: Any, event: Any) -> Generator[Any, Any, None]:
        reader = self.body_reader
        for command in original(self, event):  # only non-blocking commands: no replies
            if (
                isinstance(reader, TrailerKeepingReader)
                and reader.trailers is not None
                and isinstance(command, ReceiveHttp)
                and isinstance(command.event, RequestEndOfMessage)
                and self.request is not None
                and not self.request.stream
            ):
                self.request.trailers = reader.trailers
            yield command

    return read_body


class CategoryFormatter(logging.Formatter):
    """mitmproxy's termlog lines, with a fixed category in place of the message.

    Its messages quote client bytes ("HTTP/1 protocol error: illegal chunk header:
    bytearray(b'...')", a traceback's locals, a TLS peer's SNI); the category, the logger's
    name, the client's address and, for an exception, its type and where it was raised, are
    kept.
    """

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self._inner = handler.formatter or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        try:
            text = record.getMessage()
        except Exception:
            text = ""
        message = f"{record.name}: {error_category(text)}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}"
            message += f" ({type(exc).__name__}{where if frames else ''})"
        safe = logging.makeLogRecord(
            {**record.__dict__, "msg": message, "args": (), "exc_info": None, "exc_text": None}
        )
        return self._inner.format(safe)
