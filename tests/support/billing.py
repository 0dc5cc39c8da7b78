"""Billing through the real processes: the ledger file's usage rows, read as another process
would (read-only, polled), and the charge rule they must follow."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

MSG = [{"role": "user", "content": "Say hello"}]


def usage_row(db: Path, request_id: str, *, settled: bool = True, timeout: float = 15) -> dict:
    """The ledger's usage row of one request, once finalised (polled with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None and (not settled or row["state"] != "open"):
            return dict(row)
        if time.monotonic() > deadline:
            raise AssertionError(f"no finalised usage row for {request_id}: {row and dict(row)}")
        time.sleep(0.05)


def rows(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY reservation_id")]


def open_reservations(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT COUNT(*) FROM usage WHERE state = 'open'").fetchone()[0]


def expected_charge(row: dict) -> int:
    """The documented rule: ceil of the exact cost at the captured prices (integers only)."""
    cache = row["price_cache_read"] if row["price_cache_read"] is not None else row["price_input"]
    cached = row["cached_tokens"]
    scaled = (
        (row["prompt_tokens"] - cached) * row["price_input"]
        + cached * cache
        + row["completion_tokens"] * row["price_output"]
    )
    return -(-scaled // 1_000_000)
