"""Several gateway processes on one port: mitmproxy's TCP listener, bound with ``SO_REUSEPORT``.

mitmproxy 12 listens with ``asyncio.start_server(handler, host, port)`` in
``AsyncioServerInstance.listen`` and offers no way to pass a socket or socket option; a second
process on the same port fails with EADDRINUSE (Linux shares a port only when *every* socket on
it sets ``SO_REUSEPORT``). :func:`share_port` replaces that method with one that passes
``reuse_port=True``, so the kernel spreads new connections over every worker listening there
(measured: 200 fresh connections split 101/99 between two processes; with one killed the
survivor took all new ones). It must run in code before the master starts its servers: loaded
as a mitmproxy script it loses a race with the listeners (``/work/shared`` notes).

Only the supervisor's workers (``teegate run --workers N``) call it: a lone ``teegate run``
keeps mitmproxy's exclusive bind, so a second gateway started by mistake on the same port
fails loudly instead of silently taking half the traffic (and half the charges into another
ledger). ``tests/unit/test_listeners.py`` fails when mitmproxy moves or changes the method this
replaces; mitmproxy is pinned below 13 for it (a ``reuse_port`` option upstream would remove it).

A worker's sockets are bound but not listening until :func:`serve_held` (``hold=True``): the
kernel hands a shared port's new connections only to sockets that listen, so a worker that has
just started (or replaced one that died) takes none before it has its catalog and first
verdicts (:class:`teegate.addons.warmup.Warmup`); its peers serve them meanwhile. Listening
earlier, its first requests waited for attestation (a stream's first token ~0.6 s late in the
benchmark) while the other workers were idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy.net.free_port import get_free_port
from mitmproxy.proxy import mode_servers

_Listen = Callable[[Any, str, int], Awaitable[list[Any]]]
_held: list[asyncio.Server] = []


def share_port(*, hold: bool = False) -> None:
    """Make every TCP listener of this process bind with ``SO_REUSEPORT`` (idempotent);
    ``hold``: bound, but accepting only after :func:`serve_held`."""
    cls = mode_servers.AsyncioServerInstance
    if getattr(cls.listen, "_teegate_reuse_port", False):
        return
    cls.listen = _reuse_port(cls.listen, hold)  # type: ignore[method-assign]


async def serve_held() -> None:
    """Start accepting on every listener bound while held (a no-op when none is)."""
    while _held:
        await _held.pop(0).start_serving()


def _reuse_port(original: _Listen, hold: bool = False) -> _Listen:
    async def listen(self: Any, host: str, port: int) -> list[Any]:
        if self.mode.transport_protocol != "tcp":
            return await original(self, host, port)  # UDP/QUIC: never opened by teegate
        if port == 0:
            # As mitmproxy does for port 0: one free port, so a dual-stack host gets one port.
            port = get_free_port()
        server = await asyncio.start_server(
            self.handle_stream, host, port, reuse_port=True, start_serving=not hold
        )
        if hold:
            _held.append(server)
        return [server]

    listen._teegate_reuse_port = True  # type: ignore[attr-defined]
    listen.__wrapped__ = original  # type: ignore[attr-defined]
    return listen
