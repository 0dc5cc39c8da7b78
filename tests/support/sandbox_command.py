"""Run ``teegate sandbox`` (the developer command) as a real process and read its banner.

The banner is what a developer copies from, so tests take every URL, key and path from it
rather than from the process's settings.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.testdata import REPO_ROOT

BANNER_END = "Ctrl-C stops both."
START_TIMEOUT_S = 60.0


def sandbox_toml(work: Path) -> Path:
    """A proxy.toml on free loopback ports, with the egress CA in ``work`` (never ~/.teegate)."""
    toml = work / "proxy.toml"
    toml.write_text(
        'listen.reverse = "127.0.0.1:0"\n'
        'listen.egress = "127.0.0.2:0"\n'
        'admin.listen = "127.0.0.1:0"\n'
        f'egress.confdir = "{work / "ca"}"\n',
        encoding="utf-8",
    )
    return toml


@contextmanager
def run_sandbox_command(work: Path, *args: str) -> Iterator[str]:
    """``teegate sandbox -c <work>/proxy.toml *args``; yields its banner, stops it after."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "teegate", "sandbox", "-c", str(sandbox_toml(work)), *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        text = ""
        while BANNER_END not in text:
            line = lines.get(timeout=START_TIMEOUT_S)
            assert line is not None, f"teegate sandbox exited early:\n{text}"
            text += line
        yield text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def field(text: str, pattern: str) -> str:
    """The first group of ``pattern`` in the banner (the test fails naming it if absent)."""
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the banner:\n{text}"
    return match.group(1)
