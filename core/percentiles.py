"""Latency percentiles, defined once: nearest rank (the smallest sample with at least q% at or below it)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

#: what reports show unless asked otherwise
DEFAULT_QUANTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank ``q``-th percentile (0 < q <= 100) of already sorted values; 0.0 for none."""
    n = len(sorted_values)
    if not n:
        return 0.0
    rank = math.ceil(q / 100.0 * n)
    return float(sorted_values[min(max(rank, 1), n) - 1])


def percentiles(values: Iterable[float], qs: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, float]:
    """``{"p50": ..., "p99.9": ...}`` of unsorted ``values`` (same unit in and out)."""
    ordered = sorted(values)
    return {f"p{q:g}": percentile(ordered, q) for q in qs}
