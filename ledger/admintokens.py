"""Bearer tokens of the admin API, kept like API keys: only their SHA-256 is stored.

``teegate admin token create`` makes one and prints it once; the gateway's admin listener
looks a presented token up by its hash (:mod:`teegate.ledger.keys` explains why a plain
SHA-256 of a 256-bit random token is enough). A token is not an API key: it cannot call the
``/v1`` API, and an API key cannot call the admin API (another prefix, another table). The SQL
is portable (:meth:`Reports.fetch`): one class for the SQLite and the PostgreSQL store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from teegate.ledger import inputs
from teegate.ledger.errors import LedgerError
from teegate.ledger.keys import hash_key, new_key, plausible, same_hash
from teegate.ledger.reports import Reports

PREFIX = "tgadm_"


class UnknownAdminToken(LedgerError, LookupError):
    """No such admin token id."""


@dataclass(frozen=True, slots=True)
class AdminToken:
    token_id: int
    label: str | None
    created_ms: int
    revoked_ms: int | None


class AdminTokens:
    """The ``admin_tokens`` table, over a ledger connection (the CLI's or the gateway's)."""

    def __init__(self, store: Reports) -> None:
        self._store = store

    async def create(self, label: str | None = None) -> tuple[AdminToken, str]:
        """A new token: ``(AdminToken, plaintext)``. Show the plaintext once."""
        label = inputs.label(label)
        plaintext, digest = new_key(PREFIX)
        created = time.time_ns() // 1_000_000
        async with self._store.transaction():
            ((token_id,),) = await self._store.fetch(
                "INSERT INTO admin_tokens (token_hash, label, created_ms) VALUES (?, ?, ?) "
                "RETURNING id",
                (digest, label, created),
            )
        return AdminToken(int(token_id), label, created, None), plaintext

    async def list(self) -> list[AdminToken]:
        rows = await self._store.fetch(
            "SELECT id, label, created_ms, revoked_ms FROM admin_tokens ORDER BY id"
        )
        return [AdminToken(*r) for r in rows]

    async def revoke(self, token_id: int) -> bool:
        """Revoke; True if it was active."""
        async with self._store.transaction():
            found = await self._store.fetch("SELECT 1 FROM admin_tokens WHERE id = ?", (token_id,))
            if not found:
                raise UnknownAdminToken(f"no admin token with id {token_id}")
            changed = await self._store.fetch(
                "UPDATE admin_tokens SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL "
                "RETURNING id",
                (time.time_ns() // 1_000_000, token_id),
            )
        return bool(changed)

    async def any_active(self) -> bool:
        rows = await self._store.fetch(
            "SELECT 1 FROM admin_tokens WHERE revoked_ms IS NULL LIMIT 1"
        )
        return bool(rows)

    async def active(self, token_id: int) -> bool:
        """Whether token ``token_id`` exists and is not revoked (a dashboard session re-checks
        its token this way on every request, having never kept the token itself)."""
        rows = await self._store.fetch(
            "SELECT 1 FROM admin_tokens WHERE id = ? AND revoked_ms IS NULL", (token_id,)
        )
        return bool(rows)

    async def authenticate(self, presented: str) -> AdminToken | None:
        """The active token ``presented`` is, or None. Never raises for bad input."""
        if not plausible(presented, PREFIX):
            return None
        digest = hash_key(presented)
        rows = await self._store.fetch(
            "SELECT id, label, created_ms, revoked_ms, token_hash FROM admin_tokens "
            "WHERE token_hash = ? AND revoked_ms IS NULL",
            (digest,),
        )
        if not rows or not same_hash(bytes(rows[0][4]), digest):
            return None
        return AdminToken(*rows[0][:4])
