"""The ``SO_REUSEPORT`` listener patch (teegate/listeners.py): guarded against mitmproxy
changing the method it replaces, and shown to put two processes on one port."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from mitmproxy.proxy import mode_servers

from bench.procs import free_port
from tests.support.gateway_proc import REPO_ROOT


def _original_listen():
    listen = mode_servers.AsyncioServerInstance.listen
    return getattr(listen, "__wrapped__", listen)


def test_mitmproxy_still_listens_the_way_the_patch_replaces():
    """Fails when mitmproxy moves or changes ``AsyncioServerInstance.listen``: the patch would
    then be silently dropped (EADDRINUSE for worker 2) or drop mitmproxy's new behaviour.
    Read the new method, adapt teegate/listeners.py, then this test."""
    major = int(importlib.metadata.version("mitmproxy").split(".")[0])
    assert major == 12, "mitmproxy is pinned below 13 for the listener patch"
    listen = _original_listen()
    assert list(inspect.signature(listen).parameters) == ["self", "host", "port"]
    source = inspect.getsource(listen)
    assert "asyncio.start_server(self.handle_stream, host, port)" in source
    assert source.count("start_server(") == 1  # the one TCP listener the patch replaces
    start = inspect.getsource(mode_servers.AsyncioServerInstance._start)
    assert "await self.listen(host, port)" in start
    assert "reuse_port" not in inspect.getsource(mode_servers)  # no upstream option yet


def test_share_port_is_applied_once():
    from teegate.listeners import share_port

    before = mode_servers.AsyncioServerInstance.listen
    try:
        share_port()
        patched = mode_servers.AsyncioServerInstance.listen
        share_port()
        assert mode_servers.AsyncioServerInstance.listen is patched
        assert patched.__wrapped__ is _original_listen()
    finally:
        mode_servers.AsyncioServerInstance.listen = before


def _start(port: int, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.reuseport_server", str(port), *flags],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if flags else subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def two_on_one_port() -> Iterator[tuple[int, list[subprocess.Popen[str]]]]:
    port = free_port()
    procs = [_start(port), _start(port)]  # unpatched, one of them fails with EADDRINUSE
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()  # "" if it exited
            assert line.strip() == "LISTENING", f"reuse-port server did not start: {line!r}"
        yield port, procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _pids(port: int, n: int) -> list[int]:
    seen = []
    for _ in range(n):  # a new connection each time: the kernel picks a listener per connection
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        pid = re.search(rb"(?im)^x-worker-pid: (\d+)", answer)
        assert pid is not None, answer[:300]
        seen.append(int(pid[1]))
    return seen


def test_two_processes_share_one_port_and_the_survivor_takes_over(two_on_one_port):
    port, procs = two_on_one_port
    seen = _pids(port, 40)
    assert set(seen) == {p.pid for p in procs}, seen  # both received connections
    procs[0].kill()
    procs[0].wait()
    assert set(_pids(port, 10)) == {procs[1].pid}


def test_a_held_worker_takes_no_connection_until_it_serves(two_on_one_port):
    """A worker warming up (bound, held) gets none of the port's new connections; once it
    serves, it gets its share. The kernel hands connections only to listening sockets."""
    port, procs = two_on_one_port
    live = next(p for p in procs if p.poll() is None)
    held = _start(port, "--hold")
    try:
        assert held.stdout is not None and held.stdin is not None
        assert held.stdout.readline().strip() == "LISTENING"
        assert set(_pids(port, 30)) == {live.pid}
        held.stdin.write("go\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "SERVING"
        assert set(_pids(port, 40)) == {live.pid, held.pid}
    finally:
        held.kill()
        held.wait()
