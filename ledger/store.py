"""The ledger's writes, over one aiosqlite connection.

:class:`Store` keeps no state beyond its connection: it is what the command
line uses directly (admin writes are safe alongside a running proxy, see
:mod:`teegate.ledger.ledger`) and what :class:`~teegate.ledger.ledger.Ledger`
drives for the request path, so both create accounts and keys, credit and
revoke through the same methods. Every write happens in an explicit
``BEGIN IMMEDIATE`` transaction that inserts entries and adjusts the cached
balance together. The group commit's SQL is in :mod:`teegate.ledger.batch`,
the read-only reports in :mod:`teegate.ledger.reports`.

Why this module is long: every operator write the command line and the admin API share
(accounts, idempotent top-ups, keys and their limits) must be one transaction with its balance
update, and keeping them beside the request path's writes on the same connection makes it easy
to check that none of them interleave; :meth:`Store.open` also hands a PostgreSQL URL over.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import aiosqlite
import structlog

from teegate.ledger import dbthread, inputs
from teegate.ledger.batch import (
    ADD_BALANCE,
    FINALIZE_USAGE,
    INSERT_ENTRY,
    Batch,
    usage_params,
)
from teegate.ledger.dbthread import run_on_connection
from teegate.ledger.errors import (
    IdempotencyConflict,
    InvalidInput,
    LedgerNotFound,
    UnknownAccount,
    UnknownKey,
)
from teegate.ledger.keys import DEFAULT_PREFIX, new_key
from teegate.ledger.models import Account, ApiKey, Credit, KeyInfo, Recovered
from teegate.ledger.ops import Finalization, NewReservation
from teegate.ledger.pgschema import is_postgres
from teegate.ledger.reports import OPEN_RESERVATIONS, Reports
from teegate.ledger.schema import configure, migrate

log = structlog.get_logger("teegate.ledger")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Store(Reports):
    """SQL for accounts, keys, entries and usage records (reports: :class:`Reports`)."""

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        create: bool = True,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
    ) -> Store:
        """Connect, configure WAL and migrate. ``create=False`` refuses a missing file.

        A ``postgresql://`` URL opens a :class:`teegate.ledger.pgstore.PgStore`
        (the same methods) instead.
        """
        if is_postgres(path):
            from teegate.ledger.pgstore import PgStore

            return await PgStore.open(str(path), create=create)  # type: ignore[return-value]
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

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
        return (await self.topup(account_id, amount_micro, note, kind=kind)).balance_micro

    async def topup(
        self,
        account_id: int,
        amount_micro: int,
        note: str | None = None,
        *,
        idempotency_key: str | None = None,
        kind: str = "topup",
    ) -> Credit:
        """Credit an account (the CLI's ``accounts topup`` and the admin API's top-up).

        With ``idempotency_key``, a second call with the same key finds the entry the first
        made and credits nothing (``replayed``); the same key for another account or amount
        is refused (:class:`IdempotencyConflict`), since it cannot be a retry of the first.
        """
        inputs.credit_amount(amount_micro)
        if idempotency_key is not None:
            inputs.idempotency_key(idempotency_key)
        if kind not in ("topup", "refund"):
            raise ValueError(f"not a credit kind: {kind}")
        async with self.transaction():
            if not await self._rows("SELECT 1 FROM accounts WHERE id = ?", (account_id,)):
                raise UnknownAccount(f"no account {account_id}")
            replayed = False
            prior = None
            if idempotency_key is not None:
                prior = await self._rows(
                    "SELECT id, account_id, amount_micro FROM entries WHERE idempotency_key = ?",
                    (idempotency_key,),
                )
            if prior:
                entry_id, prior_account, prior_amount = prior[0]
                if (prior_account, prior_amount) != (account_id, amount_micro):
                    raise IdempotencyConflict(
                        "this idempotency key was already used for a different top-up "
                        f"(account {prior_account}, {prior_amount} micro-USD)"
                    )
                replayed = True
            else:
                entry_id = await self._credit(
                    account_id, amount_micro, kind, note, now_ms(), idempotency_key
                )
            rows = await self._rows(
                "SELECT balance_micro FROM accounts WHERE id = ?", (account_id,)
            )
        return Credit(
            entry_id=int(entry_id),
            account_id=account_id,
            amount_micro=amount_micro,
            balance_micro=int(rows[0][0]),
            replayed=replayed,
        )

    async def _credit(
        self,
        account_id: int,
        amount: int,
        kind: str,
        note: str | None,
        at: int,
        idempotency_key: str | None = None,
    ) -> int:
        cur = await self.db.execute(
            "INSERT INTO entries (account_id, kind, amount_micro, created_ms, note, "
            "idempotency_key) VALUES (?, ?, ?, ?, ?, ?)",
            (account_id, kind, amount, at, note, idempotency_key),
        )
        await self.db.execute(ADD_BALANCE, (amount, account_id))
        return int(cur.lastrowid or 0)

    # -- keys -------------------------------------------------------------------

    async def create_key(
        self,
        account_id: int,
        *,
        prefix: str = DEFAULT_PREFIX,
        label: str | None = None,
        rate_limit: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key for an account: ``(ApiKey, plaintext)``. Only its hash is stored."""
        label = inputs.label(label)
        rate_limit = inputs.rate_limit(rate_limit)
        plaintext, key_hash = new_key(prefix)
        async with self.transaction() as db:
            if not await self._rows("SELECT 1 FROM accounts WHERE id = ?", (account_id,)):
                raise UnknownAccount(f"no account {account_id}")
            cur = await db.execute(
                "INSERT INTO api_keys (account_id, key_hash, label, rate_limit, created_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (account_id, key_hash, label, rate_limit, now_ms()),
            )
        return ApiKey(int(cur.lastrowid or 0), account_id, label, rate_limit), plaintext

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

    async def set_rate_limit(self, key_id: int, rate_limit: int | None) -> KeyInfo:
        """A key's own requests-per-minute limit (None: the gateway's default)."""
        rate_limit = inputs.rate_limit(rate_limit)
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE api_keys SET rate_limit = ? WHERE id = ?", (rate_limit, key_id)
            )
            if cur.rowcount != 1:
                raise UnknownKey(f"no API key with id {key_id}")
        return await self.require_key(key_id)

    async def require_key(self, key_id: int) -> KeyInfo:
        found = await self.list_keys(key_id=key_id)
        if not found:
            raise UnknownKey(f"no API key with id {key_id}")
        return found[0]

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

    async def list_keys(
        self, account_id: int | None = None, *, key_id: int | None = None
    ) -> list[KeyInfo]:
        sql = (
            "SELECT k.id, k.account_id, a.name, k.label, k.rate_limit, k.created_ms, k.revoked_ms "
            "FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        )
        where, params = [], []
        if account_id is not None:
            where.append("k.account_id = ?")
            params.append(account_id)
        if key_id is not None:
            where.append("k.id = ?")
            params.append(key_id)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [KeyInfo(*r) for r in await self._rows(sql + " ORDER BY k.id", params)]

    # -- the request path -------------------------------------------------------

    async def apply_batch(
        self,
        reservations: Sequence[NewReservation],
        finals: Sequence[Finalization],
        *,
        on_commit: Callable[[tuple[list[int], dict[int, int]]], object] | None = None,
        follow_up: FollowUp | None = None,
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

        ``follow_up`` (:class:`FollowUp`): reservations that arrived while this batch was
        being committed, committed next on the same thread without a turn of the event loop
        in between (see ``ledger/writer.py``, "express").
        """
        batch = Batch(list(reservations), list(finals))

        def run(conn: sqlite3.Connection) -> tuple[list[int], dict[int, int]]:
            result = dbthread.transaction(conn, batch.apply)
            if on_commit is not None:
                with contextlib.suppress(Exception):  # committed: never report it as failed
                    on_commit(result)
            if follow_up is not None:
                with contextlib.suppress(Exception):  # this batch's result stands regardless
                    _follow_up(conn, follow_up)
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
                OPEN_RESERVATIONS
            ):
                if rid in exclude:
                    continue
                final = Finalization(
                    reservation_id=rid,
                    account_id=account_id,
                    kind="settlement",
                    delta_micro=0,  # the hold stays spent
                    charge_micro=amount,
                    source="recovered",
                    status="recovered",
                    timing=None,
                    finalized_ms=at,
                )
                await db.execute(
                    INSERT_ENTRY, (None, account_id, final.kind, 0, rid, at, "recovered")
                )
                await db.execute(FINALIZE_USAGE, usage_params(final))
                recovered.append(
                    Recovered(
                        reservation_id=rid,
                        request_id=request_id,
                        account_id=account_id,
                        key_id=key_id,
                        model=model,
                        charged_micro=amount,
                        created_ms=created,
                    )
                )
        return recovered


def _is_file(path: str) -> bool:
    return Path(path).is_file()


class FollowUp:
    """Reservations to commit on the database thread right after a batch, in batches of
    their own, and where to report each (see :meth:`Store.apply_batch`).

    ``take()`` is called on the database thread and returns the next reservations (empty:
    done); ``landed(taken, result)`` and ``failed(taken, error)`` are called there too and
    must only hand over to the event loop (``call_soon_threadsafe``). A failed follow-up
    transaction is rolled back and its reservations handed back for the ordinary path.
    """

    def __init__(
        self,
        take: Callable[[], list[Any]],
        landed: Callable[[list[Any], tuple[list[int], dict[int, int]]], object],
        failed: Callable[[list[Any], BaseException], object],
        rounds: int,
    ) -> None:
        self.take, self.landed, self.failed, self.rounds = take, landed, failed, rounds


def _follow_up(conn: sqlite3.Connection, follow: FollowUp) -> None:
    for _ in range(follow.rounds):
        taken = follow.take()
        if not taken:
            return
        batch = Batch([t.op for t in taken], [])
        try:
            result = dbthread.transaction(conn, batch.apply)
        except Exception as e:  # rolled back: the ordinary path commits (or fails) them
            follow.failed(taken, e)
            return
        follow.landed(taken, result)
