"""The two writes of the request path, as plain data for one group commit.

Keyword-only: a dozen same-typed fields (ids, amounts, token counts) are too
easy to transpose by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from teegate.ledger.billing import Prices
from teegate.ledger.models import Timing, UsageSource


@dataclass(frozen=True, slots=True, kw_only=True)
class NewReservation:
    request_id: str
    account_id: int
    key_id: int
    model: str
    prices: Prices
    amount_micro: int
    created_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Finalization:
    """A settlement or release of one reservation.

    ``delta_micro`` is the reserved amount handed back minus the charge
    (negative when usage exceeded the reservation). Within the reservation it
    is the entry amount; above it, the commit collects the extra only up to
    the account's balance (:class:`Shortfall`). ``request_id`` and ``model``
    only name the request in that case's log line.
    """

    reservation_id: int
    account_id: int
    kind: Literal["settlement", "release"]
    delta_micro: int
    charge_micro: int
    status: str  # the settlement's status, or the release's reason
    timing: Timing | None
    finalized_ms: int
    prompt_tokens: int | None = None  # None: released, or recovered without usage
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    source: UsageSource | None = None
    request_id: str = ""
    model: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Shortfall:
    """A settlement above its reservation, as committed.

    ``charged_micro`` was taken from the balance (the reservation plus what
    the balance held beyond it); ``unrecovered_micro`` is the rest of the price.
    """

    final: Finalization
    charged_micro: int
    unrecovered_micro: int
