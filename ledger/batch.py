"""The request path's writes: one group commit's SQL, run on the connection's thread.

:meth:`teegate.ledger.store.Store.apply_batch` hands a :class:`Batch` to
:mod:`teegate.ledger.dbthread` so the whole transaction is one call on the
connection's thread (one hand-off per batch instead of one per statement).
The statements that write an entry or finish a usage row are shared with the
store's admin writes and crash recovery, so every path records them alike.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from typing import Any

from teegate.ledger.ops import Finalization, NewReservation, Shortfall

INSERT_ENTRY = (
    "INSERT INTO entries (id, account_id, kind, amount_micro, reservation_id, created_ms, note) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_USAGE = (
    "INSERT INTO usage (reservation_id, request_id, account_id, key_id, model, price_input, "
    "price_output, price_cache_read, reserved_micro, state, created_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?)"
)
FINALIZE_USAGE = (
    "UPDATE usage SET state = ?, prompt_tokens = ?, completion_tokens = ?, cached_tokens = ?, "
    "charge_micro = ?, source = ?, status = ?, start_ms = ?, first_byte_ms = ?, end_ms = ?, "
    "finalized_ms = ? WHERE reservation_id = ? AND state = 'open'"
)
# FINALIZE_USAGE for many rows in one statement (see insert_rows): "{rows}" is replaced by
# "(?, ...), (?, ...)", one group of the same twelve values per settlement or release.
_FINALIZE_USAGE_MANY = (
    "UPDATE usage SET state = v.column1, prompt_tokens = v.column2, "
    "completion_tokens = v.column3, cached_tokens = v.column4, charge_micro = v.column5, "
    "source = v.column6, status = v.column7, start_ms = v.column8, first_byte_ms = v.column9, "
    "end_ms = v.column10, finalized_ms = v.column11 FROM (VALUES {rows}) AS v "
    "WHERE usage.reservation_id = v.column12 AND usage.state = 'open'"
)
_FINALIZE_USAGE_ABOVE = (
    "UPDATE usage SET state = ?, prompt_tokens = ?, completion_tokens = ?, cached_tokens = ?, "
    "charge_micro = ?, unrecovered_micro = ?, source = ?, status = ?, start_ms = ?, "
    "first_byte_ms = ?, end_ms = ?, finalized_ms = ? WHERE reservation_id = ? AND state = 'open'"
)
# The settlement entry of usage above its hold: the extra, capped at what the account has.
_CAPPED_SETTLEMENT = (
    "INSERT INTO entries (account_id, kind, amount_micro, reservation_id, created_ms) "
    "SELECT id, 'settlement', -MIN(?, MAX(balance_micro, 0)), ?, ? FROM accounts WHERE id = ? "
    "RETURNING amount_micro"
)
ADD_BALANCE = "UPDATE accounts SET balance_micro = balance_micro + ? WHERE id = ?"


class Batch:
    """One write batch's SQL, run synchronously on the connection's thread."""

    def __init__(self, reservations: list[NewReservation], finals: list[Finalization]) -> None:
        self.reservations = reservations
        self.finals = finals
        self.shortfalls: list[Shortfall] = []  # set by a committed apply()

    def apply(self, conn: sqlite3.Connection) -> tuple[list[int], dict[int, int]]:
        """Inside the caller's ``BEGIN IMMEDIATE``: ids of the reservations, new balances."""
        deltas: defaultdict[int, int] = defaultdict(int)
        ids: list[int] = []
        if self.reservations:
            # We hold the write lock: nobody else inserts, so the ids are ours.
            first = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM entries").fetchone()[0]) + 1
            ids = list(range(first, first + len(self.reservations)))
            insert_rows(
                conn,
                INSERT_ENTRY,
                [
                    (i, r.account_id, "reservation", -r.amount_micro, None, r.created_ms, None)
                    for i, r in zip(ids, self.reservations, strict=True)
                ],
            )
            insert_rows(
                conn,
                _INSERT_USAGE,
                [
                    (
                        i,
                        r.request_id,
                        r.account_id,
                        r.key_id,
                        r.model,
                        r.prices.input,
                        r.prices.output,
                        r.prices.cache_read,
                        r.amount_micro,
                        r.created_ms,
                    )
                    for i, r in zip(ids, self.reservations, strict=True)
                ],
            )
            for r in self.reservations:
                deltas[r.account_id] -= r.amount_micro
        within = [f for f in self.finals if f.delta_micro >= 0]
        above = [f for f in self.finals if f.delta_micro < 0]
        if within:
            insert_rows(
                conn,
                INSERT_ENTRY,
                [
                    (
                        None,
                        f.account_id,
                        f.kind,
                        f.delta_micro,
                        f.reservation_id,
                        f.finalized_ms,
                        None,
                    )
                    for f in within
                ],
            )
            finalize_rows(conn, [usage_params(f) for f in within])
            for f in within:
                deltas[f.account_id] += f.delta_micro
        conn.executemany(ADD_BALANCE, [(d, a) for a, d in deltas.items() if d])
        # Usage above its reservation: last, one at a time, each against the balance as this
        # transaction leaves it (this batch's reservations and credits included).
        self.shortfalls = [_settle_above_hold(conn, f) for f in above]
        for f in above:
            deltas.setdefault(f.account_id, 0)
        rows = conn.execute(
            "SELECT id, balance_micro FROM accounts WHERE id IN (SELECT value FROM json_each(?))",
            (_json_ints(deltas),),
        ).fetchall()
        return ids, dict(rows)


def _settle_above_hold(conn: sqlite3.Connection, f: Finalization) -> Shortfall:
    """Settle usage priced above its reservation, never taking the balance below zero.

    The extra is collected in SQL from the balance as it stands inside this
    transaction: ``MIN(extra, MAX(balance, 0))``. What it could not cover is
    recorded as the usage row's ``unrecovered_micro``.
    """
    extra = -f.delta_micro
    row = conn.execute(_CAPPED_SETTLEMENT, (extra, f.reservation_id, f.finalized_ms, f.account_id))
    collected = -int(row.fetchone()[0])
    conn.execute(ADD_BALANCE, (-collected, f.account_id))
    charged = f.charge_micro - extra + collected
    unrecovered = extra - collected
    params = usage_params(f)
    conn.execute(_FINALIZE_USAGE_ABOVE, (*params[:4], charged, unrecovered, *params[5:]))
    return Shortfall(final=f, charged_micro=charged, unrecovered_micro=unrecovered)


MAX_PARAMS = 999  # SQLite's historical limit of host parameters per statement


def insert_rows(conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """``sql`` (a one-row ``INSERT ... VALUES (...)``) for every row, as few statements.

    ``executemany`` steps the statement once per row, and Python's sqlite3 releases and
    re-takes the GIL around every step: on a gateway whose event loop holds the GIL most of
    the time (concurrent streams), each re-take is a wait of up to the interpreter's switch
    interval (5 ms), paid by the reservation waiting for this commit (docs/bench.md, "Third
    round"). One multi-row statement is one step.
    """
    head, _, one = sql.partition("VALUES ")
    per = max(1, MAX_PARAMS // max(1, one.count("?")))
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        conn.execute(
            head + "VALUES " + ", ".join([one] * len(chunk)),
            [v for row in chunk for v in row],
        )


def finalize_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """:data:`FINALIZE_USAGE` for every row (``usage_params``), as few statements."""
    per = MAX_PARAMS // 12
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        groups = ", ".join(["(" + ", ".join(["?"] * 12) + ")"] * len(chunk))
        conn.execute(
            _FINALIZE_USAGE_MANY.format(rows=groups), [v for row in chunk for v in row]
        )


def usage_params(f: Finalization) -> tuple[Any, ...]:
    t = f.timing
    return (
        "settled" if f.kind == "settlement" else "released",
        f.prompt_tokens,
        f.completion_tokens,
        f.cached_tokens,
        f.charge_micro,
        f.source,
        f.status,
        t.start_ms if t else None,
        t.first_byte_ms if t else None,
        t.end_ms if t else None,
        f.finalized_ms,
        f.reservation_id,
    )


def _json_ints(values: dict[int, int]) -> str:
    return "[" + ",".join(str(int(k)) for k in values) + "]"
