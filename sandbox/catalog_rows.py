"""Build the upstream's ``/v1/models`` rows from the shipped TEE model list.

The shipped file holds the *public* prices, i.e. after the gateway's markup. The upstream must list
the prices *before* the markup, so each price is divided by the markup and rounded down at 12
decimals: the gateway multiplies by the markup and rounds up to whole micro-USD, which then gives
the public number back exactly.
"""

from __future__ import annotations

import json
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

DEFAULT_MODELS_PATH = Path(__file__).resolve().parent / "data" / "tee-models.json"

# A fixed creation time keeps the catalog byte-for-byte deterministic.
CREATED = 1_735_689_600
MAX_OUTPUT_CAP = 65_536
PRICE_QUANTUM = Decimal("1e-12")

# Plausible pre-markup numbers for the non-confidential rows (USD per 1M tokens).
NON_TEE_PRICES = (("0.25", "0.85"), ("0.40", "1.75"), ("0.06", "0.24"), ("0.10", "0.41"))
NON_TEE_CONTEXT = 131_072


def upstream_price(public: Decimal, markup: Decimal) -> str:
    """Public price -> the upstream's price string (divided by the markup, 12 decimals, down)."""
    return str((public / markup).quantize(PRICE_QUANTUM, rounding=ROUND_DOWN))


def _features(tags: list[str]) -> list[str]:
    """File tag ``json-mode`` -> the upstream's ``json_mode`` and ``structured_outputs``."""
    out: list[str] = []
    for tag in tags:
        if tag == "json-mode":
            out += ["json_mode", "structured_outputs"]
        else:
            out.append(tag)
    return out


def _row(
    model_id: str,
    context_length: int,
    features: list[str],
    prompt: str,
    completion: str,
    cache_read: str,
    confidential: bool,
) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": CREATED,
        "owned_by": model_id.split("/", 1)[0],
        "confidential_compute": confidential,
        "context_length": context_length,
        "max_output_length": min(context_length, MAX_OUTPUT_CAP),
        "supported_features": features,
        "input_modalities": ["text"],
        "output_modalities": ["text"],
        "pricing": {"prompt": prompt, "completion": completion, "input_cache_read": cache_read},
    }


def load_rows(path: Path = DEFAULT_MODELS_PATH) -> dict[str, dict[str, Any]]:
    """Every catalog row (TEE rows first, then the non-TEE examples), keyed by model id."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    markup = Decimal(spec["markup"])
    rows: dict[str, dict[str, Any]] = {}
    for model in spec["models"]:
        prices = model["price_usd_per_1m"]
        public_in = Decimal(prices["input"])
        rows[model["id"]] = _row(
            model["id"],
            int(model["context_length"]),
            _features(model["features"]),
            upstream_price(public_in, markup),
            upstream_price(Decimal(prices["output"]), markup),
            upstream_price(public_in / 2, markup),
            confidential=True,
        )
    for i, model_id in enumerate(spec.get("non_tee_examples", [])):
        prompt, completion = NON_TEE_PRICES[i % len(NON_TEE_PRICES)]
        rows[model_id] = _row(
            model_id,
            NON_TEE_CONTEXT,
            ["tools", "json_mode", "structured_outputs"],
            prompt,
            completion,
            str(Decimal(prompt) / 2),
            confidential=False,
        )
    return rows


def malformed_rows() -> list[Any]:
    """Rows a sloppy upstream might list: a careful gateway skips them (no crash, no trust)."""
    return [
        {
            "object": "model",
            "confidential_compute": True,
            "pricing": {"prompt": "0.1", "completion": "0.1"},
        },
        _row("sandbox/bad-pricing-TEE", 8192, [], "abc", "abc", "abc", confidential=True),
        {
            **_row("sandbox/string-flag-TEE", 8192, [], "0.1", "0.1", "0.05", True),
            "confidential_compute": "true",
        },
        {"id": "sandbox/no-pricing-TEE", "object": "model", "confidential_compute": True},
        "not-a-row",
    ]
