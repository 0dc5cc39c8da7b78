"""Value types the ledger hands out. Plain dataclasses: no I/O, no secrets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from teegate.ledger.billing import Prices

UsageSource = Literal["usage", "bytes", "recovered"]
EntryKind = Literal["topup", "reservation", "settlement", "release", "refund"]


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An authenticated key. Carries no secret: only ids and limits."""

    key_id: int
    account_id: int
    label: str | None
    rate_limit: int | None  # requests per minute, enforced by the addons; None = unlimited


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as the operator lists it (including revoked ones)."""

    key_id: int
    account_id: int
    account_name: str
    label: str | None
    rate_limit: int | None
    created_ms: int
    revoked_ms: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Credit:
    """A committed top-up (or the one an idempotency key found: ``replayed``)."""

    entry_id: int
    account_id: int
    amount_micro: int
    balance_micro: int  # the account's cached balance after it
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    name: str
    balance_micro: int  # the cached balance (open reservations already deducted)
    created_ms: int


@dataclass(frozen=True, slots=True)
class Timing:
    """Wall-clock milliseconds since the Unix epoch; None when it never happened."""

    start_ms: int
    first_byte_ms: int | None = None
    end_ms: int | None = None


@dataclass(slots=True, eq=False, kw_only=True)
class Reservation:
    """A committed hold on an account's balance for one upstream request.

    A handle: pass it back to :meth:`Ledger.settle` or :meth:`Ledger.release`.
    The ledger records on it how it was finalised so that the second of two
    calls (say, a response hook and an error hook) is a no-op.
    """

    id: int  # the reservation's ledger entry id; unique, unlike request_id
    request_id: str
    account_id: int
    key_id: int
    model: str
    prices: Prices
    amount_micro: int
    created_ms: int
    charge_micro: int | None = field(default=None, init=False)  # set when finalised
    state: Literal["open", "settled", "released"] = field(default="open", init=False)
    # (requests counted, window start ms) when a shared rate limit was counted with it
    rate_window: tuple[int, int] | None = field(default=None, init=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered:
    """A reservation found open at start-up and settled at its full amount."""

    reservation_id: int
    request_id: str
    account_id: int
    key_id: int
    model: str
    charged_micro: int
    created_ms: int

    @classmethod
    def from_row(cls, row: tuple[int, str, int, int, str, int, int]) -> Recovered:
        """From a row in field order, as both stores' recovery queries return it."""
        rid, request_id, account_id, key_id, model, amount, created = row
        return cls(
            reservation_id=rid,
            request_id=request_id,
            account_id=account_id,
            key_id=key_id,
            model=model,
            charged_micro=amount,
            created_ms=created,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenReservation:
    reservation_id: int
    request_id: str
    account_id: int
    amount_micro: int
    created_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Mismatch:
    """One inconsistency found by :meth:`Ledger.verify`.

    kind "balance": the cached balance differs from the sum of entries;
    kind "usage": a usage record disagrees with its settlement/release entry;
    kind "negative_balance": an account's balance (or its entries' sum) is below zero.
    """

    kind: Literal["balance", "usage", "negative_balance"]
    account_id: int
    expected: int  # what the entries say
    actual: int  # what the cache / usage record says
    detail: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    mismatches: list[Mismatch]
    open_reservations: list[OpenReservation]
    accounts_checked: int
    unrecovered_micro: int = 0  # priced usage no balance could cover (see ledger.ledger)

    @property
    def ok(self) -> bool:
        return not self.mismatches


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """Usage summed per (day, account, key, model); day is a UTC date."""

    day: str
    account_id: int
    account_name: str
    key_id: int
    model: str
    requests: int
    open_requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    charge_micro: int  # taken from the balance
    unrecovered_micro: int  # priced above the reservation, beyond what the balance held


@dataclass(frozen=True, slots=True)
class UsageBucket:
    """Usage of one model in one time bucket (all accounts): what a live chart plots."""

    start_ms: int
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    charge_micro: int
