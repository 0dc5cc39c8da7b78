"""The serving lock: at most one process reserves against a ledger at a time.

Balance checks happen in the serving process's memory, so two serving
processes on one database could each approve the same last dollar; and
start-up recovery settles every open reservation, which is only right if no
other process still owns any. An exclusive ``flock`` on ``<db>-writer.lock``
enforces both. The kernel drops it when the process dies (even by SIGKILL),
so a crash never leaves a stale lock behind. Operator commands that only add
credit or change keys do not take it and work while the proxy runs.
"""

from __future__ import annotations

import fcntl
import os

from teegate.ledger.errors import LedgerLocked


class WriterLock:
    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.path = f"{db_path}-writer.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerLocked(
                f"another process is serving from the ledger {self.db_path} "
                "(it holds the writer lock); stop it first"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
