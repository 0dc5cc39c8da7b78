"""Money: accounts, API keys, prepaid balances, reservations and settlements.

The request path (the addons) uses :class:`Ledger`; operators use the
``teegate accounts|keys|usage|ledger`` commands, which share :class:`Store`.
All amounts are integer micro-USD. See :mod:`teegate.ledger.ledger` for the
durability promise and :mod:`teegate.ledger.billing` for the arithmetic.
"""

from teegate.ledger.billing import (
    Prices,
    charge_micro,
    estimate_prompt_tokens,
    reservation_micro,
    tokens_from_bytes,
)
from teegate.ledger.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
    LedgerError,
    LedgerLocked,
    LedgerNotFound,
    LedgerUnavailable,
    RateLimited,
    SchemaTooNew,
    UnknownAccount,
    UnknownKey,
)
from teegate.ledger.ledger import Ledger
from teegate.ledger.models import (
    Account,
    ApiKey,
    Credit,
    KeyInfo,
    Mismatch,
    OpenReservation,
    Recovered,
    Reservation,
    Timing,
    UsageBucket,
    UsageGroup,
    VerifyReport,
)
from teegate.ledger.pgschema import is_postgres
from teegate.ledger.store import Store
from teegate.money import InvalidAmount, format_usd, parse_usd

__all__ = [
    "Account",
    "ApiKey",
    "Credit",
    "IdempotencyConflict",
    "InsufficientBalance",
    "InvalidAmount",
    "InvalidInput",
    "KeyInfo",
    "Ledger",
    "LedgerError",
    "LedgerLocked",
    "LedgerNotFound",
    "LedgerUnavailable",
    "Mismatch",
    "OpenReservation",
    "Prices",
    "RateLimited",
    "Recovered",
    "Reservation",
    "SchemaTooNew",
    "Store",
    "Timing",
    "UnknownAccount",
    "UnknownKey",
    "UsageBucket",
    "UsageGroup",
    "VerifyReport",
    "charge_micro",
    "estimate_prompt_tokens",
    "format_usd",
    "is_postgres",
    "parse_usd",
    "reservation_micro",
    "tokens_from_bytes",
]
