"""Raw SQL on either ledger store, for tests that look past the ledger's own API.

``db`` is what the ledger was opened with: an SQLite path or a ``postgresql://``
URL. SQL is written with ``?`` placeholders and portable syntax; on PostgreSQL
they become ``%s``. Each call is its own connection and transaction (another
process's view).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from teegate.ledger import is_postgres


def rows(db: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    if is_postgres(db):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), tuple(params))
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
    with sqlite3.connect(db) as conn:
        return [tuple(r) for r in conn.execute(sql, tuple(params)).fetchall()]


def one(db: str, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    found = rows(db, sql, params)
    return found[0] if found else None


def execute(db: str, sql: str, params: Sequence[Any] = ()) -> None:
    rows(db, sql, params)
