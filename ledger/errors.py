"""Ledger exceptions.

Messages name accounts, keys and requests by id only: never by an API key's
plaintext (which the ledger does not keep) and never with request content.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error the ledger raises on purpose."""


class SchemaTooNew(LedgerError):
    """The database was written by a newer teegate; refusing to touch it."""

    def __init__(self, path: str, found: int, known: int) -> None:
        super().__init__(
            f"ledger database {path} has schema version {found}, but this teegate "
            f"only knows versions up to {known}; upgrade teegate (refusing to start)"
        )
        self.found = found
        self.known = known


class LedgerNotFound(LedgerError):
    """A command that only reads or amends a ledger was pointed at a missing file."""


class LedgerLocked(LedgerError):
    """Another process serves requests from this ledger (it holds the writer lock)."""


class LedgerUnavailable(LedgerError):
    """A write could not be committed (or the ledger is closed): fail the request closed."""


class InsufficientBalance(LedgerError):
    """The account's available balance does not cover the reservation."""

    def __init__(self, balance_micro: int, needed_micro: int) -> None:
        super().__init__(
            f"insufficient balance: {balance_micro} micro-USD available, {needed_micro} needed"
        )
        self.balance_micro = balance_micro
        self.needed_micro = needed_micro


class UnknownAccount(LedgerError, LookupError):
    """No such account (by id or name)."""


class UnknownKey(LedgerError, LookupError):
    """No such API key id."""


class InvalidInput(LedgerError, ValueError):
    """A name, label, rate limit or amount the ledger will not store."""


class RateLimited(LedgerError):
    """The key's shared per-minute window is full (PostgreSQL store: counted with the reservation).

    ``started_ms`` is when the key's current one-minute window began; ``count``
    includes this request, as a per-process limiter counts it.
    """

    def __init__(self, limit: int, count: int, started_ms: int) -> None:
        super().__init__(f"rate limit reached: {limit} requests per minute")
        self.limit = limit
        self.count = count
        self.started_ms = started_ms


class IdempotencyConflict(LedgerError):
    """An idempotency key already used for a different operation (not a retry of it)."""
