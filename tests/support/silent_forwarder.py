"""A TCP forwarder that can go silent: a network partition as a client sees it.

The test PostgreSQL cluster listens on a Unix socket only; this listens on a loopback TCP
port and relays every connection to it. :meth:`SilentForwarder.silence` stops relaying bytes
(in one direction or both) while keeping every socket open and still accepting new
connections, as a host that vanished or a partitioned network does: no RST, no FIN, no
answer. :meth:`resume` relays again (what was read meanwhile is delivered then, like
retransmissions after a partition heals). Runs its own event loop in a thread, so it serves
a gateway process as well as a ledger in the test's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path


class SilentForwarder:
    def __init__(self, unix_path: Path) -> None:
        self._target = str(unix_path)
        self._loop = asyncio.new_event_loop()
        self._up = asyncio.Event()  # client -> server flows
        self._down = asyncio.Event()  # server -> client flows
        self._older: list[asyncio.Event] = []  # connections from before heal_new_connections
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._call(self._start())

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> int:
        self._up.set()
        self._down.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def silence(self, *, up: bool = True, down: bool = True) -> None:
        """Stop relaying client->server (``up``) and/or server->client (``down``) bytes."""

        def apply() -> None:
            if up:
                self._up.clear()
            if down:
                self._down.clear()

        self._loop.call_soon_threadsafe(apply)

    def resume(self) -> None:
        """Relay again, on every connection."""

        def apply() -> None:
            for flow in (*self._older, self._up, self._down):
                flow.set()

        self._loop.call_soon_threadsafe(apply)

    def heal_new_connections(self) -> None:
        """Relay on connections made from now on; the older ones stay silent (bytes held)
        until :meth:`resume`: a partition that healed for new routes first."""

        def apply() -> None:
            self._older += [self._up, self._down]
            self._up, self._down = asyncio.Event(), asyncio.Event()
            self._up.set()
            self._down.set()

        self._loop.call_soon_threadsafe(apply)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            sreader, swriter = await asyncio.open_unix_connection(self._target)
        except OSError:
            cwriter.close()
            return
        self._writers |= {cwriter, swriter}
        await asyncio.gather(
            self._pump(creader, swriter, self._up), self._pump(sreader, cwriter, self._down)
        )
        for w in (cwriter, swriter):
            self._writers.discard(w)
            w.close()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await flowing.wait()  # silent: the bytes wait here, nothing is closed
                writer.write(data)
                await writer.drain()
        await flowing.wait()  # a partitioned peer does not learn of the end either
        with contextlib.suppress(OSError):
            writer.write_eof()

    def __enter__(self) -> SilentForwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.close()

        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
