"""timing_stats (the speed benchmarks' statistics): the median and its distribution-free confidence interval."""

import math

from benchmarks.timing_stats import median, median_ci


def test_median_by_hand():
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 3.0, 2.0]) == 2.5


def _coverage(n: int, j: int) -> float:
    """P(x_(j) <= median <= x_(n+1-j)) = 1 - 2 P(Binomial(n, 1/2) <= j - 1), by hand."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n


def test_median_ci_uses_the_textbook_ranks():
    assert median_ci([1.0] * 5) is None  # too few values for a 95% interval
    # n = 6: only (min, max) reaches 95% (coverage 1 - 2/64 = 0.969)
    assert median_ci([6.0, 1.0, 5.0, 2.0, 4.0, 3.0]) == (1.0, 6.0)
    # n = 15: ranks 4 and 12 (coverage 0.965; ranks 5 and 11 would give 0.882)
    values = [float(v) for v in range(1, 16)]
    assert median_ci(values) == (4.0, 12.0)
    assert _coverage(15, 4) >= 0.95 > _coverage(15, 5)
    # n = 100: ranks 40 and 61
    assert median_ci([float(v) for v in range(1, 101)]) == (40.0, 61.0)
    assert _coverage(100, 40) >= 0.95 > _coverage(100, 41)
