"""speed.py's statistics: the median and the bootstrap interval of paired ratios."""

import random

from benchmarks.speed import _median, bootstrap_ci


def test_median_by_hand():
    assert _median([3.0, 1.0, 2.0]) == 2.0 and _median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_bootstrap_interval_brackets_the_median_and_shrinks_with_rounds():
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0)  # no spread, no uncertainty
    rng = random.Random(1)
    few = [1.05 + rng.gauss(0, 0.1) for _ in range(8)]
    many = [1.05 + rng.gauss(0, 0.1) for _ in range(200)]
    lo_f, hi_f = bootstrap_ci(few)
    lo_m, hi_m = bootstrap_ci(many)
    assert lo_f <= _median(few) <= hi_f and lo_m <= _median(many) <= hi_m
    assert hi_m - lo_m < hi_f - lo_f
    assert lo_m > 1.0  # 200 rounds around 1.05 +- 0.1: the interval excludes parity
    assert bootstrap_ci([1.0, 2.0, 3.0], stat=max, n=500)[1] == 3.0
