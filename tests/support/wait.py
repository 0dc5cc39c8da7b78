"""Waiting on another process's state: poll a condition until it holds, with a deadline.

Tests never sleep to win a race; they wait for what they can observe (a log line, a ledger row, a
verdict), bounded so that a condition that never comes fails the test instead of hanging it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def until[T](predicate: Callable[[], T], what: str = "condition", timeout: float = 15.0) -> T:
    """``predicate()``'s first truthy value; AssertionError naming ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
