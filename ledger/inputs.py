"""Validation of what operators and callers ask the ledger to store.

Shared by the async API and the command line so both refuse the same things
*before* anything is written.
"""

from __future__ import annotations

from teegate.ledger.errors import InvalidInput
from teegate.money import MAX_AMOUNT_MICRO

MAX_NAME = 64
MAX_LABEL = 100
MAX_RATE_LIMIT = 1_000_000  # requests per minute
MAX_IDEMPOTENCY_KEY = 200


def _printable(text: str) -> bool:
    return all(ch.isprintable() for ch in text)


def account_name(name: object) -> str:
    """1-64 printable characters, not all digits (digits-only refers to an id)."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise InvalidInput("account name must be non-empty, without surrounding spaces")
    if len(name) > MAX_NAME or not _printable(name):
        raise InvalidInput(f"account name must be at most {MAX_NAME} printable characters")
    if name.isdigit():
        raise InvalidInput("account name cannot be all digits (those refer to account ids)")
    return name


def label(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_LABEL or not _printable(value):
        raise InvalidInput(f"label must be at most {MAX_LABEL} printable characters")
    return value


def rate_limit(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("rate limit must be a whole number of requests per minute")
    if not 1 <= value <= MAX_RATE_LIMIT:
        raise InvalidInput(f"rate limit must be between 1 and {MAX_RATE_LIMIT} requests/minute")
    return value


def credit_amount(value: object) -> int:
    """A top-up or refund: a positive int of micro-USD, at most MAX_AMOUNT_MICRO."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("amounts are integer micro-USD")
    if not 0 < value <= MAX_AMOUNT_MICRO:
        raise InvalidInput("amount must be positive and at most 1,000,000,000 USD")
    return value


def hold_amount(value: object) -> int:
    """A reservation: a non-negative int of micro-USD."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("amounts are integer micro-USD")
    if not 0 <= value <= MAX_AMOUNT_MICRO:
        raise InvalidInput("reservation amount out of range")
    return value


def idempotency_key(value: object) -> str:
    """1-200 printable characters (an operator's or a client's retry token, stored as is)."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_IDEMPOTENCY_KEY
        or not _printable(value)
    ):
        raise InvalidInput(
            f"idempotency key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters"
        )
    return value
