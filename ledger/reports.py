"""The ledger's connection and its read-only reports: verify, usage, open holds.

:class:`Reports` is the base of :class:`teegate.ledger.store.Store`: it owns
the connection (and its transaction helper) and every query that only reads,
so that :mod:`teegate.ledger.store` holds the writes and nothing else long.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

from teegate.ledger.models import (
    Mismatch,
    OpenReservation,
    UsageBucket,
    UsageGroup,
    VerifyReport,
)

# Reservations with neither settlement nor release: what a crash leaves behind.
OPEN_RESERVATIONS = """
    SELECT r.id, u.request_id, r.account_id, u.key_id, u.model, -r.amount_micro, r.created_ms
    FROM entries r JOIN usage u ON u.reservation_id = r.id
    WHERE r.kind = 'reservation'
      AND NOT EXISTS (SELECT 1 FROM entries f WHERE f.reservation_id = r.id)
    ORDER BY r.id
"""


class Reports:
    """A connection to the ledger database and the reports read from it."""

    # The one piece of report SQL the two stores spell differently: a usage row's UTC day.
    _USAGE_DAY = "date(u.created_ms / 1000, 'unixepoch')"

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path
        self.open_transactions = 0
        """Transactions of several round trips under way on this connection, counted from
        before their BEGIN is queued to after their COMMIT or ROLLBACK ran: while one is,
        nothing else may be queued on the connection's thread (it would run inside it)."""

    @asynccontextmanager
    async def transaction(self, mode: str = "IMMEDIATE") -> AsyncIterator[aiosqlite.Connection]:
        self.open_transactions += 1
        try:
            await self.db.execute(f"BEGIN {mode}")
            try:
                yield self.db
                await self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                raise
        finally:
            self.open_transactions -= 1

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        # One round trip to the connection's thread (execute + fetchall + close).
        return list(await self.db.execute_fetchall(sql, params))

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one portable statement (``?`` placeholders; ``RETURNING`` for writes).

        For modules that keep their own SQL (admin tokens, receipts) and must run on both
        stores: :class:`teegate.ledger.pgstore.PgStore` translates the placeholders.
        """
        return await self._rows(sql, params)

    async def write_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Portable statements (``?`` placeholders) in one transaction, results discarded."""
        async with self.transaction():
            for sql, params in statements:
                await self.fetch(sql, params)

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """One portable statement for each parameter tuple (inside :meth:`transaction`)."""
        await self.db.executemany(sql, params)

    async def open_reservations(self) -> list[OpenReservation]:
        return [
            OpenReservation(
                reservation_id=rid,
                request_id=request_id,
                account_id=account_id,
                amount_micro=amount,
                created_ms=created,
            )
            for rid, request_id, account_id, _k, _m, amount, created in await self._rows(
                OPEN_RESERVATIONS
            )
        ]

    async def verify(self) -> VerifyReport:
        """Recompute every balance from entries and cross-check usage records.

        Runs in one read transaction, i.e. on one consistent snapshot, so it
        is safe while a proxy is writing.
        """
        mismatches: list[Mismatch] = []
        async with self.transaction("DEFERRED"):
            accounts = await self._rows(
                "SELECT a.id, a.name, a.balance_micro, "
                "COALESCE((SELECT SUM(e.amount_micro) FROM entries e "
                "WHERE e.account_id = a.id), 0) "
                "FROM accounts a ORDER BY a.id"
            )
            for account_id, name, cached, derived in accounts:
                if cached != derived:
                    mismatches.append(
                        Mismatch(
                            kind="balance",
                            account_id=account_id,
                            expected=derived,
                            actual=cached,
                            detail=f"account {account_id} ({name}): cached balance {cached} "
                            f"but entries sum to {derived}",
                        )
                    )
                if min(cached, derived) < 0:
                    mismatches.append(_negative(account_id, name, cached, derived))
            mismatches.extend(await self._usage_mismatches())
            open_res = await self.open_reservations()
            unrecovered = await self._rows("SELECT COALESCE(SUM(unrecovered_micro), 0) FROM usage")
        return VerifyReport(
            mismatches=mismatches,
            open_reservations=open_res,
            accounts_checked=len(accounts),
            unrecovered_micro=int(unrecovered[0][0]),
        )

    async def charge_taken(self, reservation_id: int) -> int | None:
        """What a settled reservation took from the balance (``usage.charge_micro``): its
        price, or less when it was priced above the reservation and the balance could not
        cover the extra. None when it is not (yet) recorded as settled."""
        rows = await self._rows(
            "SELECT charge_micro FROM usage WHERE reservation_id = ? AND state = 'settled'",
            (reservation_id,),
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def _usage_mismatches(self) -> list[Mismatch]:
        out: list[Mismatch] = []
        rows = await self._rows(
            "SELECT r.id, r.account_id, u.reservation_id IS NOT NULL, u.account_id, u.state, "
            "u.reserved_micro, u.charge_micro, -r.amount_micro, f.kind, f.amount_micro "
            "FROM entries r LEFT JOIN usage u ON u.reservation_id = r.id "
            "LEFT JOIN entries f ON f.reservation_id = r.id "
            "WHERE r.kind = 'reservation' ORDER BY r.id"
        )
        for rid, acct, has_usage, u_acct, state, reserved, charge, held, fkind, famount in rows:
            problem = _usage_problem(
                bool(has_usage), acct, u_acct, state, reserved, charge, held, fkind, famount
            )
            if problem:
                expected, actual, why = problem
                out.append(
                    Mismatch(
                        kind="usage",
                        account_id=acct,
                        expected=expected,
                        actual=actual,
                        detail=f"reservation {rid}: {why}",
                    )
                )
        for rid, acct, state, lost in await self._rows(
            "SELECT reservation_id, account_id, state, unrecovered_micro FROM usage "
            "WHERE unrecovered_micro <> 0 AND (state <> 'settled' OR source <> 'usage' "
            "AND source <> 'bytes')"
        ):
            out.append(
                Mismatch(
                    kind="usage",
                    account_id=acct,
                    expected=0,
                    actual=lost,
                    detail=f"reservation {rid}: {lost} unrecovered on a {state} row "
                    "not settled from usage",
                )
            )
        orphans = await self._rows(
            "SELECT u.reservation_id, u.account_id FROM usage u "
            "LEFT JOIN entries r ON r.id = u.reservation_id AND r.kind = 'reservation' "
            "WHERE r.id IS NULL"
        )
        for rid, acct in orphans:
            out.append(
                Mismatch(
                    kind="usage",
                    account_id=acct,
                    expected=0,
                    actual=0,
                    detail=f"usage record {rid} has no reservation entry",
                )
            )
        return out

    async def usage_report(
        self,
        *,
        account_id: int | None = None,
        key_id: int | None = None,
        model: str | None = None,
        since_ms: int | None = None,
    ) -> list[UsageGroup]:
        where, params = [], []
        for column, value in (
            ("u.account_id = ?", account_id),
            ("u.key_id = ?", key_id),
            ("u.model = ?", model),
            ("u.created_ms >= ?", since_ms),
        ):
            if value is not None:
                where.append(column)
                params.append(value)
        sql = (
            f"SELECT {self._USAGE_DAY} AS day, u.account_id, a.name, u.key_id, u.model, "
            "COUNT(*), COUNT(*) FILTER (WHERE u.state = 'open'), "
            "COALESCE(SUM(u.prompt_tokens), 0), "
            "COALESCE(SUM(u.completion_tokens), 0), COALESCE(SUM(u.cached_tokens), 0), "
            "COALESCE(SUM(u.charge_micro), 0), COALESCE(SUM(u.unrecovered_micro), 0) "
            "FROM usage u JOIN accounts a ON a.id = u.account_id "
            + (("WHERE " + " AND ".join(where) + " ") if where else "")
            + "GROUP BY day, u.account_id, a.name, u.key_id, u.model "
            "ORDER BY day, u.account_id, u.key_id, u.model"
        )
        return [UsageGroup(*r) for r in await self._rows(sql, params)]

    async def usage_timeline(self, *, since_ms: int, bucket_ms: int) -> list[UsageBucket]:
        """Usage per model in time buckets of ``bucket_ms`` from ``since_ms`` on (for charts).

        Bucketed by each request's reservation time; open requests count as requests, with
        no tokens or charge yet.
        """
        if bucket_ms <= 0:
            raise ValueError("bucket_ms must be positive")
        rows = await self._rows(
            "SELECT (created_ms / ?) * ?, model, COUNT(*), "
            "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(charge_micro), 0) FROM usage WHERE created_ms >= ? "
            "GROUP BY 1, model ORDER BY 1, model",
            (bucket_ms, bucket_ms, since_ms),
        )
        return [UsageBucket(*r) for r in rows]


def _negative(account_id: int, name: str, cached: int, derived: int) -> Mismatch:
    """A balance below zero, which no operation of the ledger makes (a settlement above its
    reservation stops at zero; the rest is unrecovered): a row from before that rule, or one
    written by hand. Reported on the cached balance, or the entries' sum when only it is."""
    actual = cached if cached < 0 else derived
    where = "balance" if cached < 0 else "entries sum"
    return Mismatch(
        kind="negative_balance",
        account_id=account_id,
        expected=0,
        actual=actual,
        detail=f"account {account_id} ({name}): {where} {actual} is below zero",
    )


def _usage_problem(
    has_usage: bool,
    acct: int,
    u_acct: int | None,
    state: str | None,
    reserved: int | None,
    charge: int | None,
    held: int,
    fkind: str | None,
    famount: int | None,
) -> tuple[int, int, str] | None:
    """What is wrong with one reservation's records, as (expected, actual, why)."""
    if not has_usage or reserved is None:
        return held, 0, "no usage record"
    if u_acct != acct:
        return acct, u_acct or 0, "usage record names another account"
    if reserved != held:
        return held, reserved, "usage reserved amount differs from the reservation entry"
    if fkind is None:
        return None if state == "open" else (0, 0, f"state {state!r} but no settlement/release")
    famount = famount or 0
    if fkind == "release":
        if state != "released" or charge != 0 or famount != held:
            return held, famount, f"release entry {famount}, state {state!r}, charge {charge}"
        return None
    if state != "settled" or charge is None or famount != held - charge:
        return (
            held - (charge or 0),
            famount,
            (
                f"settlement entry {famount} does not match reserved {held} - charge {charge} "
                f"(state {state!r})"
            ),
        )
    return None
