"""run_group kills the command's own children on a timeout, not only the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.group_run import run_group
from tests.support.wait import until

SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_timeout_kills_the_grandchildren(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_group([sys.executable, "-c", SPAWNER, str(pid_file)], timeout=5)
    assert pid_file.exists(), "the command did not start its child in time"
    child = int(pid_file.read_text())
    # Reaped by init once killed; until then a zombie may still answer kill(0) briefly.
    until(lambda: not _alive(child) or _zombie(child), what="the grandchild gone")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_a_finished_command_returns_its_output() -> None:
    done = run_group([sys.executable, "-c", "print('hi')"], timeout=30)
    assert done.returncode == 0 and done.stdout == "hi\n"
