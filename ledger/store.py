"""All of the ledger's SQL, over one aiosqlite connection.

:class:`Store` keeps no state beyond its connection: it is what the command
line uses directly (admin writes are safe alongside a running proxy, see
:mod:`teegate.ledger.ledger`) and what :class:`~ledger.ledger.Ledger` drives for the
request path. Every write happens in an explicit ``BEGIN IMMEDIATE``
transaction that inserts entries and adjusts the cached balance together.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import structlog
from teegate.ledger import dbthread, inputs
from teegate.ledger.dbthread import run_on_connection
from teegate.ledger.errors import InvalidInput, LedgerNotFound, UnknownAccount, UnknownKey
from teegate.ledger.models import (
    Account,
    ApiKey,
    KeyInfo,
    Mismatch,
    OpenReservation,
    Recovered,
    UsageGroup,
    VerifyReport,
)
from teegate.ledger.ops import Finalization, NewReservation, Shortfall
from teegate.ledger.schema import configure, migrate

log = structlog.get_logger("teegate.ledger")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_INSERT_ENTRY = (
    "INSERT INTO entries (id, account_id, kind, amount_micro, reservation_id, created_ms, note) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_USAGE = (
    "INSERT INTO usage (reservation_id, request_id, account_id, key_id, model, price_input, "
    "price_output, price_cache_read, reserved_micro, state, created_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?)"
)
_FINALIZE_USAGE = (
    "UPDATE usage SET state = ?, prompt_tokens = ?, completion_tokens = ?, cached_tokens = ?, "
    "charge_micro = ?, source = ?, status = ?, start_ms = ?, first_byte_ms = ?, end_ms = ?, "
    "finalized_ms = ? WHERE reservation_id = ? AND state = 'open'"
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
_ADD_BALANCE = "UPDATE accounts SET balance_micro = balance_micro + ? WHERE id = ?"
_OPEN_RESERVATIONS = """
    SELECT r.id, u.request_id, r.account_id, u.key_id, u.model, -r.amount_micro, r.created_ms
    FROM entries r JOIN usage u ON u.reservation_id = r.id
    WHERE r.kind = 'reservation'
      AND NOT EXISTS (SELECT 1 FROM entries f WHERE f.reservation_id = r.id)
    ORDER BY r.id
"""


class Store:
    """SQL for accounts, keys, entries and usage records."""

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        create: bool = True,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
    ) -> Store:
        """Connect, configure WAL and migrate. ``create=False`` refuses a missing file."""
        path = str(path)
        if not create and not _is_file(path):
            raise LedgerNotFound(f"no ledger database at {path}")
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await configure(db, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)
            await migrate(db, path)
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        await self.db.close()

    @asynccontextmanager
    async def transaction(self, mode: str = "IMMEDIATE") -> AsyncIterator[aiosqlite.Connection]:
        await self.db.execute(f"BEGIN {mode}")
        try:
            yield self.db
            await self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                await self.db.execute("ROLLBACK")
            raise

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        # One round trip to the connection's thread (execute + fetchall + close).
        return list(await self.db.execute_fetchall(sql, params))

    # -- accounts ---------------------------------------------------------------

    async def create_account(self, name: str, initial_micro: int = 0) -> Account:
        """Create an account, optionally with a first top-up, in one transaction."""
        name = inputs.account_name(name)
        if initial_micro:
            inputs.credit_amount(initial_micro)
        created = now_ms()
        async with self.transaction() as db:
            if await self._rows("SELECT 1 FROM accounts WHERE name = ?", (name,)):
                raise InvalidInput(f"an account named {name!r} already exists")
            cur = await db.execute(
                "INSERT INTO accounts (name, created_ms) VALUES (?, ?)", (name, created)
            )
            account_id = int(cur.lastrowid or 0)
            if initial_micro:
                await self._credit(account_id, initial_micro, "topup", "initial top-up", created)
        return Account(account_id, name, initial_micro, created)

    async def find_account(self, ref: int | str) -> Account | None:
        """By id (an int or a string of digits) or by exact name."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            where, param = "id = ?", int(ref)
        else:
            where, param = "name = ?", ref
        rows = await self._rows(
            f"SELECT id, name, balance_micro, created_ms FROM accounts WHERE {where}", (param,)
        )
        return Account(*rows[0]) if rows else None

    async def require_account(self, ref: int | str) -> Account:
        account = await self.find_account(ref)
        if account is None:
            raise UnknownAccount(f"no account {ref!r}")
        return account

    async def list_accounts(self) -> list[Account]:
        rows = await self._rows(
            "SELECT id, name, balance_micro, created_ms FROM accounts ORDER BY id"
        )
        return [Account(*r) for r in rows]

    async def data_version(self) -> int:
        """Changes whenever *another* connection commits (SQLite's own counter)."""
        rows = await self._rows("PRAGMA data_version")
        return int(rows[0][0])

    async def balances(self) -> dict[int, int]:
        return dict(await self._rows("SELECT id, balance_micro FROM accounts"))

    async def credit(self, account_id: int, amount_micro: int, kind: str, note: str | None) -> int:
        """A top-up or refund; returns the new cached balance."""
        inputs.credit_amount(amount_micro)
        if kind not in ("topup", "refund"):
            raise ValueError(f"not a credit kind: {kind}")
        async with self.transaction():
            if not await self._rows("SELECT 1 FROM accounts WHERE id = ?", (account_id,)):
                raise UnknownAccount(f"no account {account_id}")
            await self._credit(account_id, amount_micro, kind, note, now_ms())
            rows = await self._rows(
                "SELECT balance_micro FROM accounts WHERE id = ?", (account_id,)
            )
        return int(rows[0][0])

    async def _credit(
        self, account_id: int, amount: int, kind: str, note: str | None, at: int
    ) -> None:
        await self.db.execute(_INSERT_ENTRY, (None, account_id, kind, amount, None, at, note))
        await self.db.execute(_ADD_BALANCE, (amount, account_id))

    # -- keys -------------------------------------------------------------------

    async def insert_key(
        self, account_id: int, key_hash: bytes, label: str | None, rate_limit: int | None
    ) -> ApiKey:
        label = inputs.label(label)
        rate_limit = inputs.rate_limit(rate_limit)
        async with self.transaction() as db:
            if not await self._rows("SELECT 1 FROM accounts WHERE id = ?", (account_id,)):
                raise UnknownAccount(f"no account {account_id}")
            cur = await db.execute(
                "INSERT INTO api_keys (account_id, key_hash, label, rate_limit, created_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (account_id, key_hash, label, rate_limit, now_ms()),
            )
        return ApiKey(int(cur.lastrowid or 0), account_id, label, rate_limit)

    async def revoke_key(self, key_id: int) -> bool:
        """Revoke; True if it was active, False if already revoked."""
        async with self.transaction() as db:
            if not await self._rows("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)):
                raise UnknownKey(f"no API key with id {key_id}")
            cur = await db.execute(
                "UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
                (now_ms(), key_id),
            )
        return cur.rowcount == 1

    async def find_key(self, key_hash: bytes) -> tuple[ApiKey, bytes] | None:
        """The active key with this hash, and the stored hash, or None."""
        rows = await self._rows(
            "SELECT id, account_id, label, rate_limit, key_hash FROM api_keys "
            "WHERE key_hash = ? AND revoked_ms IS NULL",
            (key_hash,),
        )
        if not rows:
            return None
        key_id, account_id, label, rate_limit, stored = rows[0]
        return ApiKey(key_id, account_id, label, rate_limit), bytes(stored)

    async def list_keys(self, account_id: int | None = None) -> list[KeyInfo]:
        sql = (
            "SELECT k.id, k.account_id, a.name, k.label, k.rate_limit, k.created_ms, k.revoked_ms "
            "FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        )
        params: tuple[Any, ...] = ()
        if account_id is not None:
            sql += " WHERE k.account_id = ?"
            params = (account_id,)
        return [KeyInfo(*r) for r in await self._rows(sql + " ORDER BY k.id", params)]

    # -- the request path -------------------------------------------------------

    async def apply_batch(
        self,
        reservations: Sequence[NewReservation],
        finals: Sequence[Finalization],
        *,
        on_commit: Callable[[tuple[list[int], dict[int, int]]], object] | None = None,
    ) -> tuple[list[int], dict[int, int]]:
        """Commit reservations and finalisations in one transaction.

        Returns the reservation entry ids (in order) and the cached balances
        of every touched account as of this commit (read under the write
        lock, so they include other processes' committed top-ups).

        The whole transaction runs as one call on the connection's thread
        (:mod:`teegate.ledger.dbthread`): one hand-off per batch instead of one per
        statement, which is most of the request path's ledger CPU.
        ``on_commit(result)`` is called on that thread right after COMMIT
        (for a thread-safe early notification; anything it raises is ignored,
        the result is returned either way).
        """
        batch = _Batch(list(reservations), list(finals))

        def run(conn: sqlite3.Connection) -> tuple[list[int], dict[int, int]]:
            result = dbthread.transaction(conn, batch.apply)
            if on_commit is not None:
                with contextlib.suppress(Exception):  # committed: never report it as failed
                    on_commit(result)
            return result

        result = await run_on_connection(self.db, run)
        for s in batch.shortfalls:
            f = s.final
            log.warning(
                "ledger.charge_above_reservation",
                reservation_id=f.reservation_id,
                request_id=f.request_id,
                model=f.model,
                account_id=f.account_id,
                reserved_micro=f.charge_micro + f.delta_micro,
                price_micro=f.charge_micro,
                charged_micro=s.charged_micro,
                unrecovered_micro=s.unrecovered_micro,
                rule="charged up to the account's balance; the rest is recorded as unrecovered",
            )
        return result

    async def recover(self, exclude: set[int]) -> list[Recovered]:
        """Settle every open reservation not in ``exclude`` at its full amount.

        A reservation is committed before its request goes upstream and is the
        upper bound of what that request may cost; one that was never settled
        or released belongs to a process that died in between, so the
        documented rule charges it in full. The settlement entry's amount is 0
        (the held amount simply stays spent), so balances do not move.
        """
        recovered: list[Recovered] = []
        at = now_ms()
        async with self.transaction() as db:
            for rid, request_id, account_id, key_id, model, amount, created in await self._rows(
                _OPEN_RESERVATIONS
            ):
                if rid in exclude:
                    continue
                await db.execute(
                    _INSERT_ENTRY, (None, account_id, "settlement", 0, rid, at, "recovered")
                )
                await db.execute(
                    _FINALIZE_USAGE,
                    (
                        "settled",
                        None,
                        None,
                        None,
                        amount,
                        "recovered",
                        "recovered",
                        None,
                        None,
                        None,
                        at,
                        rid,
                    ),
                )
                recovered.append(
                    Recovered(rid, request_id, account_id, key_id, model, amount, created)
                )
        return recovered

    # -- checks and reports -----------------------------------------------------

    async def open_reservations(self) -> list[OpenReservation]:
        return [
            OpenReservation(rid, request_id, account_id, amount, created)
            for rid, request_id, account_id, _k, _m, amount, created in await self._rows(
                _OPEN_RESERVATIONS
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
                            "balance",
                            account_id,
                            derived,
                            cached,
                            f"account {account_id} ({name}): cached balance {cached} "
                            f"but entries sum to {derived}",
                        )
                    )
            mismatches.extend(await self._usage_mismatches())
            open_res = await self.open_reservations()
            unrecovered = await self._rows("SELECT COALESCE(SUM(unrecovered_micro), 0) FROM usage")
        return VerifyReport(mismatches, open_res, len(accounts), int(unrecovered[0][0]))

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
                out.append(Mismatch("usage", acct, expected, actual, f"reservation {rid}: {why}"))
        for rid, acct, state, lost in await self._rows(
            "SELECT reservation_id, account_id, state, unrecovered_micro FROM usage "
            "WHERE unrecovered_micro <> 0 AND (state <> 'settled' OR source <> 'usage' "
            "AND source <> 'bytes')"
        ):
            out.append(
                Mismatch(
                    "usage",
                    acct,
                    0,
                    lost,
                    f"reservation {rid}: {lost} unrecovered on a {state} row "
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
                Mismatch("usage", acct, 0, 0, f"usage record {rid} has no reservation entry")
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
            "SELECT date(u.created_ms / 1000, 'unixepoch') AS day, u.account_id, a.name, u.key_id, "
            "u.model, COUNT(*), SUM(u.state = 'open'), COALESCE(SUM(u.prompt_tokens), 0), "
            "COALESCE(SUM(u.completion_tokens), 0), COALESCE(SUM(u.cached_tokens), 0), "
            "COALESCE(SUM(u.charge_micro), 0), COALESCE(SUM(u.unrecovered_micro), 0) "
            "FROM usage u JOIN accounts a ON a.id = u.account_id "
            + (("WHERE " + " AND ".join(where) + " ") if where else "")
            + "GROUP BY day, u.account_id, u.key_id, u.model "
            "ORDER BY day, u.account_id, u.key_id, u.model"
        )
        return [UsageGroup(*r) for r in await self._rows(sql, params)]


class _Batch:
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
            conn.executemany(
                _INSERT_ENTRY,
                [
                    (i, r.account_id, "reservation", -r.amount_micro, None, r.created_ms, None)
                    for i, r in zip(ids, self.reservations, strict=True)
                ],
            )
            conn.executemany(
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
            conn.executemany(
                _INSERT_ENTRY,
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
            conn.executemany(_FINALIZE_USAGE, [_usage_params(f) for f in within])
            for f in within:
                deltas[f.account_id] += f.delta_micro
        conn.executemany(_ADD_BALANCE, [(d, a) for a, d in deltas.items() if d])
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
    conn.execute(_ADD_BALANCE, (-collected, f.account_id))
    charged = f.charge_micro - extra + collected
    unrecovered = extra - collected
    params = _usage_params(f)
    conn.execute(_FINALIZE_USAGE_ABOVE, (*params[:4], charged, unrecovered, *params[5:]))
    return Shortfall(f, charged, unrecovered)


def _is_file(path: str) -> bool:
    return Path(path).is_file()


def _usage_params(f: Finalization) -> tuple[Any, ...]:
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
