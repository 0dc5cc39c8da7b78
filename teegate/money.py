"""Money as text: decimal USD <-> integer micro-USD, for ``catalog`` and ``ledger`` alike.

Every amount the gateway stores or computes is an ``int`` of micro-USD
(1 USD = 1_000_000). Only the edges speak decimal USD -- the upstream's price
list, the operator's command line, reports and error messages -- and they go
through :mod:`decimal`, never ``float``. This module is shared by
:mod:`teegate.catalog` and :mod:`teegate.ledger`, which must not import each
other, so it imports neither (nor anything outside the standard library):
one spelling of an amount, whichever package prints it.

Two conversions from USD exist because they serve different promises:
:func:`parse_usd` is an operator's amount and must be exact (an amount with
more than six decimal places is refused, not rounded: someone typing
"0.0000005" made a mistake we should not guess about); :func:`usd_to_micro`
is an upstream price times the markup and is rounded *up*, so the provider is
never short by a rounding error.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

MICRO_PER_USD = 1_000_000

# 10^15 micro-USD = 1 billion USD: far above any real top-up, far below the
# 2^63 limit of an SQLite INTEGER even after summing many of them.
MAX_AMOUNT_MICRO = 10**15

# Plain decimal notation only: no sign, exponent, spaces, "$" or "_" separators.
_AMOUNT_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")


class InvalidAmount(ValueError):
    """An operator amount that is not a plain, non-negative decimal with <= 6 places."""


def parse_usd(text: str) -> int:
    """Parse "12.50" into 12_500_000 micro-USD, exactly.

    Rejects negatives, NaN/Infinity, exponents, more than six decimal places
    (unless the extra digits are zeros, e.g. "1.5000000" is exactly 1.5) and
    amounts above :data:`MAX_AMOUNT_MICRO`. Zero is accepted; callers that
    need a positive amount (a top-up) check that themselves.
    """
    if not isinstance(text, str):
        raise InvalidAmount("amount must be text such as 12.50")
    stripped = text.strip()
    if not _AMOUNT_RE.fullmatch(stripped):
        raise InvalidAmount(
            f"malformed amount {text!r}: use a plain non-negative decimal such as 12.50"
        )
    try:
        micro = Decimal(stripped) * MICRO_PER_USD
    except InvalidOperation as e:  # pragma: no cover - the regex admits only valid decimals
        raise InvalidAmount(f"malformed amount {text!r}") from e
    if micro != micro.to_integral_value():
        raise InvalidAmount(f"amount {text!r} has more than 6 decimal places (micro-USD)")
    value = int(micro)
    if value > MAX_AMOUNT_MICRO:
        raise InvalidAmount(f"amount {text!r} exceeds the limit of {format_usd(MAX_AMOUNT_MICRO)}")
    return value


def format_usd(micro: int) -> str:
    """12_500_000 -> "12.50"; 123 -> "0.000123"; -5 -> "-0.000005".

    At least two decimal places, at most six, trailing zeros beyond two
    trimmed. ``parse_usd(format_usd(x)) == x`` for every non-negative ``x``.
    """
    if isinstance(micro, bool) or not isinstance(micro, int):
        raise TypeError("micro-USD amounts are ints")
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_USD)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"


def usd_to_micro(value: str | int | Decimal, markup: Decimal = Decimal(1)) -> int:
    """A price in USD (a decimal string, never a float) times ``markup``, rounded up."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError("prices must be decimal strings or integers, not floats")
    try:
        amount = Decimal(value) * markup * MICRO_PER_USD
    except InvalidOperation:
        raise ValueError("not a decimal amount") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError("not a non-negative finite amount")
    return int(amount.to_integral_value(rounding=ROUND_CEILING))
