"""Catalog parsing, money conversion and suggestions."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teegate.catalog.models import parse_rows
from teegate.catalog.store import suggest
from teegate.money import format_usd, usd_to_micro

ROW = {
    "id": "a/B-TEE",
    "confidential_compute": True,
    "context_length": 8192,
    "supported_features": ["json-mode", "tools"],
    "pricing": {"prompt": "0.151351351351", "completion": Decimal("0.2"), "input_cache_read": 0},
}


def test_rows_are_kept_only_when_the_flag_is_exactly_true():
    rows = [
        ROW,
        {**ROW, "id": "flag-false", "confidential_compute": False},
        {**ROW, "id": "flag-string", "confidential_compute": "true"},
        {**ROW, "id": "flag-one", "confidential_compute": 1},
        {**ROW, "id": "no-flag", "confidential_compute": None},
        {**ROW, "id": "float-price", "pricing": {"prompt": 0.1, "completion": "1"}},
        {**ROW, "id": "bad-price", "pricing": {"prompt": "abc", "completion": "1"}},
        {**ROW, "id": "neg-price", "pricing": {"prompt": "-1", "completion": "1"}},
        {**ROW, "id": "no-context", "context_length": None},
        {**ROW, "id": "has space"},
        "not a row",
    ]
    models, others, skipped = parse_rows(rows, Decimal("1.85"))
    assert list(models) == ["a/B-TEE"]
    assert others == {"flag-false"}
    assert len(skipped) == len(rows) - 2
    m = models["a/B-TEE"]
    assert m.pricing.input == 280_000  # 0.151351351351 * 1.85 rounded up to the micro-USD
    assert m.pricing.output == 370_000 and m.pricing.cache_read == 0
    assert m.supports_json and m.supports_tools


def test_skip_reasons_do_not_quote_row_content():
    _, _, skipped = parse_rows([{**ROW, "pricing": {"prompt": "SECRET-ish", "completion": "1"}}], 1)
    assert skipped and "SECRET" not in skipped[0]


def test_max_model_len_is_accepted_as_context_length():
    row = {**ROW}
    del row["context_length"]
    models, _, _ = parse_rows([{**row, "max_model_len": 4096}], Decimal(1))
    assert models["a/B-TEE"].context_length == 4096


@given(
    price=st.decimals(min_value=0, max_value=1000, places=9, allow_nan=False),
    markup=st.decimals(min_value=Decimal("0.5"), max_value=5, places=3, allow_nan=False),
)
def test_marked_up_micro_usd_rounds_up_by_less_than_one(price, markup):
    exact = price * markup * 1_000_000
    micro = usd_to_micro(str(price), markup)
    assert isinstance(micro, int)
    assert exact <= micro < exact + 1
    assert micro == int(exact.to_integral_value(rounding=ROUND_CEILING))


@given(st.integers(min_value=0, max_value=10**12))
def test_micro_usd_round_trips_through_its_decimal_string(micro):
    assert usd_to_micro(format_usd(micro)) == micro


def test_floats_are_refused_on_the_money_path():
    with pytest.raises(ValueError):
        usd_to_micro(0.1)  # type: ignore[arg-type]


IDS = [
    "deepseek-ai/DeepSeek-V3.2-TEE",
    "deepseek-ai/DeepSeek-V3.1-TEE",
    "deepseek-ai/DeepSeek-V3-0324-TEE",
    "deepseek-ai/DeepSeek-R1-0528-TEE",
    "Qwen/Qwen3-32B-TEE",
    "openai/gpt-oss-120b-TEE",
]


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3-0324-TEE"),
        ("deepseek-ai/DeepSeek-R1", "deepseek-ai/DeepSeek-R1-0528-TEE"),
        ("Qwen/Qwen3-32B", "Qwen/Qwen3-32B-TEE"),
        ("qwen/qwen3-32b-tee", "Qwen/Qwen3-32B-TEE"),
        ("openai/gpt-oss-120b", "openai/gpt-oss-120b-TEE"),
        ("deepseek-ai/DeepSeek-V3.2", "deepseek-ai/DeepSeek-V3.2-TEE"),
        ("mistral/totally-else", None),
    ],
)
def test_suggestions(asked, expected):
    assert suggest(asked, IDS) == expected
