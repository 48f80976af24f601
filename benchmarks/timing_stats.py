"""Statistics of repeated timings: the median and its distribution-free confidence interval.

Shared by the speed benchmarks (``speed.py``, ``bench_detection.py``); imports nothing of them.
"""

from __future__ import annotations

import math

__all__ = ["median", "median_ci"]


def median(xs: list[float]) -> float:
    """The median of `xs` (the mean of the two middle values for an even count)."""
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median (order statistics, binomial); None below 6 values.

    The interval [x_(j), x_(n+1-j)] of the sorted values holds the median with probability
    1 - 2 P(Binomial(n, 1/2) < j); j is the largest rank that keeps that at or above `level`.
    """
    n = len(values)
    if n < 6:
        return None
    xs = sorted(values)
    tail, j = 0.0, 0
    while True:  # P(B <= j) for the next j, added up term by term
        nxt = tail + math.comb(n, j) / 2**n
        if 1 - 2 * nxt < level:
            break
        tail, j = nxt, j + 1
    j = max(j, 1)
    return xs[j - 1], xs[n - j]
