"""The four paths a request can take, each started in front of a given sandbox upstream.

1. ``direct``: straight to the upstream (the floor nothing can beat).
2. ``mitmdump``: plain ``mitmdump`` in reverse mode with no addons (the platform's floor),
   configured like teegate's listener (``connection_strategy=lazy``), printing nothing.
3. ``teegate``: the gateway as ``teegate run`` starts it, with whatever the addon chain holds
   (see :mod:`bench.teegate_path`).
4. ``litellm``: LiteLLM's proxy, the peer users would otherwise pick (see :mod:`bench.litellm`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.procs import free_port, stop, wait_http
from tests.support.sandbox_proc import SandboxProc

CHAT = "/v1/chat/completions"


@dataclass
class Running:
    """A path ready for load: where to send, which key, which process to watch."""

    url: str  # full chat completions URL
    key: str
    pid: int | None  # the proxy process (None for direct: nothing in between)
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    def stop(self) -> None:
        self._stop()


class Path_(Protocol):
    name: str
    label: str

    def start(self, upstream: SandboxProc, workdir: Path, streaming: bool) -> Running: ...

    def describe(self) -> dict[str, Any]: ...


class Direct:
    name, label = "direct", "direct (floor)"

    def start(self, upstream: SandboxProc, workdir: Path, streaming: bool) -> Running:
        return Running(upstream.base_url + CHAT, upstream.api_key, None)

    def describe(self) -> dict[str, Any]:
        return {"what": "client -> sandbox upstream"}


class Mitmdump:
    name, label = "mitmdump", "mitmdump (floor)"

    def start(self, upstream: SandboxProc, workdir: Path, streaming: bool) -> Running:
        """``streaming``: stream bodies (``stream_large_bodies=1``); without it mitmproxy holds
        a whole SSE response before sending any of it, which is no floor for a relay."""
        port = free_port()
        stream_opt = ["--set", "stream_large_bodies=1"] if streaming else []
        exe = Path(sys.executable).with_name("mitmdump")
        with open(workdir / "mitmdump.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    str(exe),
                    "--mode",
                    f"reverse:{upstream.base_url}@127.0.0.1:{port}",
                    "-q",
                    "--set",
                    "connection_strategy=lazy",
                    "--set",
                    "flow_detail=0",
                    "--set",
                    f"confdir={workdir / 'mitmproxy'}",
                    *stream_opt,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(
                base + "/v1/models", proc, 30, {"authorization": f"Bearer {upstream.api_key}"}
            )
        except BaseException:
            stop(proc)
            raise
        return Running(base + CHAT, upstream.api_key, proc.pid, lambda: stop(proc))

    def describe(self) -> dict[str, Any]:
        return {
            "what": "mitmdump --mode reverse, no addons, connection_strategy=lazy, -q; "
            "for streams also stream_large_bodies=1 (else it buffers whole SSE responses)"
        }
