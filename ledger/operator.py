"""The operator's writes and look-ups, in SQL both stores run: accounts, top-ups, keys.

:class:`OperatorStore` is the one implementation behind the command line and the admin API
on either store: :class:`teegate.ledger.store.Store` (SQLite) and
:class:`teegate.ledger.pgstore.PgStore` (PostgreSQL) only add how they connect, their
transactions and the request path's writes. Every statement here is portable: ``?``
placeholders (PgStore translates them) and ``RETURNING`` for what an insert or update made
(SQLite 3.35+), so one copy of each validation and each idempotency rule serves both.
"""

from __future__ import annotations

import time
from typing import Any, Self

from teegate.ledger import inputs
from teegate.ledger.errors import IdempotencyConflict, InvalidInput, UnknownAccount, UnknownKey
from teegate.ledger.keys import DEFAULT_PREFIX, new_key
from teegate.ledger.models import Account, ApiKey, Credit, KeyInfo
from teegate.ledger.reports import Reports


def now_ms() -> int:
    """The ledger's clock: wall-clock milliseconds, as every ``*_ms`` column stores them."""
    return time.time_ns() // 1_000_000


class OperatorStore(Reports):
    """Accounts, idempotent top-ups and keys; the dialect is in the subclass's connection."""

    # Errors that mean "a concurrent top-up with the same idempotency key won": retried.
    # None on SQLite, whose BEGIN IMMEDIATE serialises writers before they look.
    _RACE_ERRORS: tuple[type[Exception], ...] = ()

    async def close(self) -> None:
        await self.db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _one(self, sql: str, params: Any = ()) -> Any:
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    # -- accounts ---------------------------------------------------------------

    async def create_account(self, name: str, initial_micro: int = 0) -> Account:
        """Create an account, optionally with a first top-up, in one transaction."""
        name = inputs.account_name(name)
        if initial_micro:
            inputs.credit_amount(initial_micro)
        created = now_ms()
        async with self.transaction():
            if await self._rows("SELECT 1 FROM accounts WHERE name = ?", (name,)):
                raise InvalidInput(f"an account named {name!r} already exists")
            (account_id,) = await self._one(
                "INSERT INTO accounts (name, created_ms) VALUES (?, ?) RETURNING id",
                (name, created),
            )
            if initial_micro:
                await self._credit(account_id, initial_micro, "topup", "initial top-up", created)
        return Account(int(account_id), name, initial_micro, created)

    async def find_account(self, ref: int | str) -> Account | None:
        """By id (an int or a string of digits) or by exact name."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            where, param = "id = ?", int(ref)
        else:
            where, param = "name = ?", ref
        row = await self._one(
            f"SELECT id, name, balance_micro, created_ms FROM accounts WHERE {where}", (param,)
        )
        return Account(*row) if row else None

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
        On PostgreSQL two workers racing with one key may both find no entry: the unique
        index lets one insert commit, the other's fails, and this tries again, finding the
        winner's entry (:attr:`_RACE_ERRORS`).
        """
        inputs.credit_amount(amount_micro)
        if idempotency_key is not None:
            inputs.idempotency_key(idempotency_key)
        if kind not in ("topup", "refund"):
            raise ValueError(f"not a credit kind: {kind}")
        for attempt in range(3):
            try:
                return await self._topup_once(account_id, amount_micro, note, idempotency_key, kind)
            except self._RACE_ERRORS:
                if idempotency_key is None or attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _topup_once(
        self, account_id: int, amount: int, note: str | None, key: str | None, kind: str
    ) -> Credit:
        async with self.transaction():
            if not await self._rows("SELECT 1 FROM accounts WHERE id = ?", (account_id,)):
                raise UnknownAccount(f"no account {account_id}")
            prior = None
            if key is not None:
                prior = await self._one(
                    "SELECT id, account_id, amount_micro FROM entries WHERE idempotency_key = ?",
                    (key,),
                )
            if prior is None:
                entry_id, balance = await self._credit(
                    account_id, amount, kind, note, now_ms(), key
                )
                return Credit(
                    entry_id=entry_id,
                    account_id=account_id,
                    amount_micro=amount,
                    balance_micro=balance,
                )
            entry_id, prior_account, prior_amount = prior
            if (prior_account, prior_amount) != (account_id, amount):
                raise IdempotencyConflict(
                    "this idempotency key was already used for a different top-up "
                    f"(account {prior_account}, {prior_amount} micro-USD)"
                )
            (balance,) = await self._one(
                "SELECT balance_micro FROM accounts WHERE id = ?", (account_id,)
            )
        return Credit(
            entry_id=int(entry_id),
            account_id=account_id,
            amount_micro=amount,
            balance_micro=int(balance),
            replayed=True,
        )

    async def _credit(
        self,
        account_id: int,
        amount: int,
        kind: str,
        note: str | None,
        at: int,
        idempotency_key: str | None = None,
    ) -> tuple[int, int]:
        """Insert the entry and move the cached balance: ``(entry id, new balance)``."""
        (entry_id,) = await self._one(
            "INSERT INTO entries (account_id, kind, amount_micro, created_ms, note, "
            "idempotency_key) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (account_id, kind, amount, at, note, idempotency_key),
        )
        (balance,) = await self._one(
            "UPDATE accounts SET balance_micro = balance_micro + ? WHERE id = ? "
            "RETURNING balance_micro",
            (amount, account_id),
        )
        return int(entry_id), int(balance)

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
        async with self.transaction():
            if not await self._rows("SELECT 1 FROM accounts WHERE id = ?", (account_id,)):
                raise UnknownAccount(f"no account {account_id}")
            (key_id,) = await self._one(
                "INSERT INTO api_keys (account_id, key_hash, label, rate_limit, created_ms) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (account_id, key_hash, label, rate_limit, now_ms()),
            )
        return ApiKey(int(key_id), account_id, label, rate_limit), plaintext

    async def revoke_key(self, key_id: int) -> bool:
        """Revoke; True if it was active, False if already revoked."""
        async with self.transaction():
            if not await self._rows("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)):
                raise UnknownKey(f"no API key with id {key_id}")
            changed = await self._rows(
                "UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL "
                "RETURNING id",
                (now_ms(), key_id),
            )
        return bool(changed)

    async def set_rate_limit(self, key_id: int, rate_limit: int | None) -> KeyInfo:
        """A key's own requests-per-minute limit (None: the gateway's default).

        On PostgreSQL the ``api_keys_changed`` trigger bumps ``key_version``: every worker
        drops its cached copy of the key within its poll interval.
        """
        rate_limit = inputs.rate_limit(rate_limit)
        async with self.transaction():
            changed = await self._rows(
                "UPDATE api_keys SET rate_limit = ? WHERE id = ? RETURNING id",
                (rate_limit, key_id),
            )
            if not changed:
                raise UnknownKey(f"no API key with id {key_id}")
        return await self.require_key(key_id)

    async def require_key(self, key_id: int) -> KeyInfo:
        found = await self.list_keys(key_id=key_id)
        if not found:
            raise UnknownKey(f"no API key with id {key_id}")
        return found[0]

    async def find_key(self, key_hash: bytes) -> tuple[ApiKey, bytes] | None:
        """The active key with this hash, and the stored hash, or None."""
        row = await self._one(
            "SELECT id, account_id, label, rate_limit, key_hash FROM api_keys "
            "WHERE key_hash = ? AND revoked_ms IS NULL",
            (key_hash,),
        )
        if row is None:
            return None
        key_id, account_id, label, rate_limit, stored = row
        return ApiKey(key_id, account_id, label, rate_limit), bytes(stored)

    async def list_keys(
        self, account_id: int | None = None, *, key_id: int | None = None
    ) -> list[KeyInfo]:
        sql = (
            "SELECT k.id, k.account_id, a.name, k.label, k.rate_limit, k.created_ms, k.revoked_ms "
            "FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        )
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("k.account_id = ?", account_id), ("k.id = ?", key_id)):
            if value is not None:
                where.append(column)
                params.append(value)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [KeyInfo(*r) for r in await self._rows(sql + " ORDER BY k.id", params)]
