"""benchmarks/medmask_teacher_sweep.py: the per-threshold summary over seeds, by hand."""

import math

from benchmarks.medmask_teacher_sweep import report, summarise


def test_summarise_means_stds_and_no_pseudo_label():
    seed0 = [{"threshold": 0.3, "pseudo_precision": 0.2, "pseudo_recall": 0.5, "pseudo_per_image": 1.0},
             {"threshold": 0.6, "pseudo_precision": float("nan"), "pseudo_recall": 0.0, "pseudo_per_image": 0.0}]
    seed1 = [{"threshold": 0.3, "pseudo_precision": 0.4, "pseudo_recall": 0.3, "pseudo_per_image": 2.0},
             {"threshold": 0.6, "pseudo_precision": 1.0, "pseudo_recall": 0.1, "pseudo_per_image": 0.5}]
    table = summarise([seed0, seed1], [0.3, 0.6])
    p = table[0]["pseudo_precision"]
    assert math.isclose(p[0], 0.3) and math.isclose(p[1], math.sqrt(0.02)) and p[2] == 2  # std ddof=1
    assert table[0]["pseudo_per_image"][:2] == [1.5, math.sqrt(0.5)]
    assert table[1]["pseudo_precision"] == [1.0, 0.0, 1]  # seed 0 gave none: left out, counted
    r = table[1]["pseudo_recall"]
    assert math.isclose(r[0], 0.05) and math.isclose(r[1], math.sqrt(0.005))
    lines = report("stage 2", [0, 1], table)
    assert lines[-2] == "| 0.30 | 0.30 +- 0.14 | 0.40 +- 0.14 | 1.50 +- 0.71 |"
    assert lines[-1] == "| 0.60 | 1.00 +- 0.00 (1 seeds) | 0.05 +- 0.07 | 0.25 +- 0.35 |"
    assert summarise([[{"threshold": 0.9, "pseudo_precision": float("nan"), "pseudo_recall": 0.0,
                        "pseudo_per_image": 0.0}]], [0.9])[0]["pseudo_precision"] is None
