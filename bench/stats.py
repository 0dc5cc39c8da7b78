"""Percentiles, computed the same way for every path (nearest rank, no interpolation)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of already sorted values (0 < q <= 100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, p50, p90, p99 and max in the values' unit, rounded to 0.01; ``None`` when empty."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    s = sorted(values)
    return {
        "n": len(s),
        "mean": round(sum(s) / len(s), 2),
        "p50": round(percentile(s, 50), 2),
        "p90": round(percentile(s, 90), 2),
        "p99": round(percentile(s, 99), 2),
        "max": round(s[-1], 2),
    }
