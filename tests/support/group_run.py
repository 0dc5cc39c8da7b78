"""``subprocess.run`` for a command that starts processes of its own (the bench harnesses).

On a timeout, ``subprocess.run`` kills only the direct child: the gateways, sandboxes and load
generators it started live on as orphans, still holding CPU and ports for the rest of the suite
(seen on a loaded machine). Here the command gets its own process group, and the whole group is
killed when the time is up.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any


def run_group(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, timeout=...)``."""
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
