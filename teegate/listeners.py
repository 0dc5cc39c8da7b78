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
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy.net.free_port import get_free_port
from mitmproxy.proxy import mode_servers

_Listen = Callable[[Any, str, int], Awaitable[list[Any]]]


def share_port() -> None:
    """Make every TCP listener of this process bind with ``SO_REUSEPORT`` (idempotent)."""
    cls = mode_servers.AsyncioServerInstance
    if getattr(cls.listen, "_teegate_reuse_port", False):
        return
    cls.listen = _reuse_port(cls.listen)  # type: ignore[method-assign]


def _reuse_port(original: _Listen) -> _Listen:
    async def listen(self: Any, host: str, port: int) -> list[Any]:
        if self.mode.transport_protocol != "tcp":
            return await original(self, host, port)  # UDP/QUIC: never opened by teegate
        if port == 0:
            # As mitmproxy does for port 0: one free port, so a dual-stack host gets one port.
            port = get_free_port()
        return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]

    listen._teegate_reuse_port = True  # type: ignore[attr-defined]
    listen.__wrapped__ = original  # type: ignore[attr-defined]
    return listen
