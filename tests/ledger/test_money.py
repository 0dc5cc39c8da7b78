"""Money arithmetic: exact decimal parsing and the one charge rounding rule."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teegate.ledger.billing import (
    Prices,
    charge_micro,
    estimate_prompt_tokens,
    reservation_micro,
    tokens_from_bytes,
)
from teegate.money import MAX_AMOUNT_MICRO, InvalidAmount, format_usd, parse_usd

prices_st = st.builds(
    Prices,
    input=st.integers(0, 100_000_000),
    output=st.integers(0, 100_000_000),
    cache_read=st.none() | st.integers(0, 100_000_000),
)
tokens_st = st.integers(0, 10_000_000)


@given(prices_st, tokens_st, tokens_st, st.data())
def test_charge_is_exact_cost_rounded_up_by_less_than_one_micro(
    prices: Prices, prompt: int, completion: int, data: st.DataObject
) -> None:
    cached = data.draw(st.integers(0, prompt))
    charge = charge_micro(prices, prompt, completion, cached)
    # Exact cost as a rational number of micro-USD, computed independently with Decimal.
    cache_price = prices.input if prices.cache_read is None else prices.cache_read
    exact = (
        Decimal(prompt - cached) * prices.input
        + Decimal(cached) * cache_price
        + Decimal(completion) * prices.output
    ) / Decimal(1_000_000)
    assert isinstance(charge, int)
    assert charge >= exact  # never below the exact cost
    assert charge - exact < 1  # never a whole micro-USD above it


@given(prices_st, tokens_st, tokens_st)
def test_charge_is_monotonic_in_tokens(prices: Prices, prompt: int, completion: int) -> None:
    base = charge_micro(prices, prompt, completion)
    assert charge_micro(prices, prompt + 1, completion) >= base
    assert charge_micro(prices, prompt, completion + 1) >= base


def test_cache_read_falls_back_to_input_price() -> None:
    no_cache_price = Prices(input=3_000_000, output=0)
    assert charge_micro(no_cache_price, 1000, 0, cached_tokens=1000) == 3000
    assert charge_micro(Prices(3_000_000, 0, cache_read=1_000_000), 1000, 0, 1000) == 1000


def test_known_charges() -> None:
    p = Prices.from_usd("0.28", "0.42")  # DeepSeek-V3.2-TEE list price
    assert p == Prices(280_000, 420_000)
    # 1000 prompt * 0.28 + 500 completion * 0.42 = 280 + 210 = 490 micro-USD exactly.
    assert charge_micro(p, 1000, 500) == 490
    # 1 prompt token costs 0.28 micro-USD: rounded up to 1, never down to 0.
    assert charge_micro(p, 1, 0) == 1
    assert charge_micro(p, 0, 0) == 0


@pytest.mark.parametrize(
    "args",
    [(-1, 0, 0), (0, -1, 0), (5, 0, 6), (1.0, 0, 0), (True, 0, 0)],
)
def test_charge_rejects_invalid_counts(args: tuple[object, object, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        charge_micro(Prices(1, 1), *args)  # type: ignore[arg-type]


def test_prices_reject_floats_and_negatives() -> None:
    with pytest.raises(TypeError):
        Prices(0.28, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Prices(-1, 1)
    with pytest.raises(InvalidAmount):
        Prices.from_usd("0.1234567", "1")


@given(st.integers(0, MAX_AMOUNT_MICRO))
def test_amounts_round_trip(micro: int) -> None:
    text = format_usd(micro)
    assert parse_usd(text) == micro
    assert Decimal(text) * 1_000_000 == micro


@given(st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False))
def test_decimal_text_parses_exactly(value: Decimal) -> None:
    text = format(value, "f")
    assert parse_usd(text) == int(value * 1_000_000)


@pytest.mark.parametrize(
    "text",
    [
        "-1",
        "-0",
        "1.0000001",
        "NaN",
        "nan",
        "Infinity",
        "1e3",
        "",
        " ",
        "1,50",
        "$5",
        "1_000",
        "0x10",
        "1.2.3",
        "1000000001",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_usd(text)


def test_parse_accepts_plain_decimals() -> None:
    assert parse_usd("12.50") == 12_500_000
    assert parse_usd("0.000001") == 1
    assert parse_usd("1.5000000") == 1_500_000  # extra zeros lose nothing
    assert parse_usd(".5") == 500_000
    assert parse_usd("0") == 0
    assert format_usd(-5) == "-0.000005"
    assert format_usd(12_500_000) == "12.50"


@given(st.integers(0, 10**9))
def test_tokens_from_bytes_is_ceil_of_a_third(n: int) -> None:
    t = tokens_from_bytes(n)
    assert 3 * t >= n > 3 * (t - 1)


HELLO = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
# Its compact JSON {"model":"m","messages":[{"role":"user","content":"hello there"}]}, by hand:
# letters and spaces, half a token each: model m messages role user content "hello there"
#   = 5+1+8+4+4+7+11 = 40 -> 20 tokens;
# other bytes, one each: 7 quoted strings (14 quotes), 4 colons, 2 commas, { [ { } ] } (6) = 26;
# plus the 64-token template overhead: 64 + 20 + 26 = 110.
HELLO_TOKENS = 110


def test_prompt_estimate_of_a_known_body() -> None:
    assert estimate_prompt_tokens(HELLO) == HELLO_TOKENS


@given(prices_st, st.integers(0, 200_000))
def test_reservation_covers_prompt_estimate_and_max_tokens(prices: Prices, max_tokens: int) -> None:
    held = reservation_micro(prices, HELLO, max_tokens)
    # Whatever the real prompt (at most the estimate) and completion (at most
    # max_tokens), the hold covers the charge: the estimate at the input price plus the
    # whole budget at the output price, rounded up to a whole micro-USD.
    scaled = HELLO_TOKENS * prices.input + max_tokens * prices.output
    assert held == -(-scaled // 1_000_000)


def test_reservation_of_a_known_body() -> None:
    # 110 tokens * $1/M + 1000 tokens * $2/M = 110 + 2000 micro-USD.
    assert reservation_micro(Prices(input=1_000_000, output=2_000_000), HELLO, 1000) == 2110
    # $0.30/M in, $0.50/M out: (110 * 300_000 + 7 * 500_000) / 1M = 36.5 -> 37 micro-USD.
    assert reservation_micro(Prices(input=300_000, output=500_000), HELLO, 7) == 37
