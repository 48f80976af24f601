"""Seed-paired statistics: t-interval and sign test by hand, comparisons, claims and the verdict."""

import math

import numpy as np
import pytest

from benchmarks.stats import (
    claim,
    cluster_bootstrap,
    comparisons,
    paired,
    sign_test,
    t_interval,
    verdict,
    verdict_sentence,
)


def test_t_interval_and_sign_test_by_hand():
    lo, hi = t_interval([0.1, 0.2, 0.3])  # mean 0.2, sd 0.1, t(0.975, 2 df) = 4.3027
    assert (lo, hi) == (pytest.approx(0.2 - 4.302653 * 0.1 / math.sqrt(3)), pytest.approx(0.2 + 4.302653 * 0.1
                                                                                          / math.sqrt(3)))
    assert t_interval([0.2, 0.2, 0.2]) == (pytest.approx(0.2), pytest.approx(0.2))  # no spread, no width
    assert all(math.isnan(v) for v in t_interval([0.3]))  # one seed decides nothing
    d = np.random.default_rng(1).normal(0.1, 0.05, 200)
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert t_interval(d)[0] == pytest.approx(d.mean() - 1.972 * se, rel=1e-3)  # many seeds: ~ the normal interval
    # five seeds, one against: the percentile bootstrap would say [+0.010, +0.100]; the t-interval spans zero
    lo, hi = t_interval([0.1, 0.1, 0.1, 0.1, -0.05])
    assert lo < 0 < hi
    assert sign_test([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)  # two-sided: 2 * 0.5^5
    assert sign_test([1, 1, 1, -1, 0]) == pytest.approx(2 * 5 / 16)  # zero dropped; P(X <= 1 | n=4) = 5/16
    assert sign_test([0, 0]) == 1.0


def _cells(task, kind, metric, frac, values):
    """values: {(row, role, protocol): [per-seed metric]}."""
    out = []
    for (row, role, protocol), vals in values.items():
        for seed, v in enumerate(vals):
            out.append({"task": task, "kind": kind, "fraction": frac, "seed": seed, "row": row, "role": role,
                        "protocol": protocol, "backbone": "ViT-Ti/8" if role != "cnn" else "ResNet-18",
                        "pretraining": row, "n_train": 8 if frac != 1 else 100, "metrics": {metric: v}})
    return out


def test_cluster_bootstrap_draws_whole_clusters():
    """Samples 0 and 1 form cluster "a" (value 0), sample 2 cluster "b" (value 1): a resample of two clusters is
    {a, a} (mean 0), {a, b} (1/3) or {b, b} (1), never a value that splits "a"; each has probability >= 1/4, so
    the 95% percentile interval is [0, 1]. A statistic undefined on more than 5% of the resamples gets none."""
    values, seen = np.array([0.0, 0.0, 1.0]), set()

    def mean(i: np.ndarray) -> float:
        seen.add(round(float(values[i].mean()), 6))
        return float(values[i].mean())

    assert cluster_bootstrap(mean, ["a", "a", "b"], reps=400) == (0.0, 1.0)
    assert seen == {0.0, round(1 / 3, 6), 1.0}
    # undefined on a quarter of the resamples (both draws "b"): more than 5%, no interval; on none, one
    assert all(math.isnan(v) for v in cluster_bootstrap(lambda i: math.nan if (i == 2).all() else 0.0,
                                                         ["a", "a", "b"], reps=400))
    assert cluster_bootstrap(lambda i: 0.0, ["a", "a", "b"], reps=10) == (0.0, 0.0)


def test_pairs_by_seed_and_claims():
    cells = _cells("a", "classification", "auc", 8, {
        ("mae", "pretrained", "finetune"): [0.8, 0.82, 0.85, 0.81, 0.9],
        ("rnd", "random", "finetune"): [0.7, 0.72, 0.74, 0.70, 0.8],
        ("cnn", "cnn", "scratch"): [0.79, 0.85, 0.83, 0.84, 0.86]})
    cells = [c for c in cells if not (c["row"] == "cnn" and c["seed"] == 4)]  # the CNN lacks seed 4: 4 pairs
    comps = comparisons(cells)
    pairs = {(c["a"]["row"], c["b"]["row"]): c for c in comps}
    assert set(pairs) == {("mae", "rnd"), ("mae", "cnn"), ("rnd", "cnn")}
    vs_rnd, vs_cnn = pairs[("mae", "rnd")], pairs[("mae", "cnn")]
    assert vs_rnd["diffs"] == pytest.approx([0.1, 0.1, 0.11, 0.11, 0.1]) and vs_rnd["decided"]
    assert vs_cnn["seeds"] == [0, 1, 2, 3] and vs_cnn["diffs"] == pytest.approx([0.01, -0.03, 0.02, -0.03])
    assert not vs_cnn["decided"] and vs_cnn["up"] == 2 and vs_cnn["down"] == 2
    assert claim(vs_rnd).startswith("a, 8 labels: mae (finetune) vs ViT-Ti/8 random init (finetune): **better** (auc "
                                     "+0.104, 95% CI [+0.097, +0.111] over 5 seeds (5 up / 0 down, sign test p = 0.062")
    assert "no difference shown (auc -0.007" in claim(vs_cnn)  # -0.0075
    # a bound that 3 decimals would print as +0.000 under "better" gets the digits that show it above zero
    close = {**vs_rnd, "ci": [0.00034, 0.028]}
    assert "95% CI [+0.0003, +0.028]" in claim(close) and "**better**" in claim(close)
    v = verdict(comps)
    assert v == {"tasks": {"a": False}, "protocol": "finetune", "pays_off": False, "tasks_yes": 0, "tasks_total": 1}
    assert "does **not** pay off" in verdict_sentence(v)


def test_verdict_needs_both_baselines_at_every_low_budget_in_most_tasks():
    good = {("mae", "pretrained", "finetune"): [0.9, 0.91, 0.92], ("rnd", "random", "finetune"): [0.7, 0.71, 0.7],
            ("cnn", "cnn", "scratch"): [0.8, 0.8, 0.81]}
    cells = _cells("a", "classification", "auc", 8, good) + _cells("b", "classification", "auc", 8, good)
    cells += _cells("a", "classification", "auc", 1, {k: [0.5, 0.5, 0.5] for k in good})  # all labels: not counted
    cells += _cells("c", "segmentation", "dice", 8, {**good, ("cnn", "cnn", "scratch"): [0.95, 0.96, 0.97]})
    # a kNN row that wins everywhere does not count: the verdict reads the primary protocol only
    cells += _cells("c", "segmentation", "dice", 8, {("mae", "pretrained", "knn"): [0.99, 0.99, 0.99],
                                                     ("rnd", "random", "knn"): [0.1, 0.1, 0.1]})
    v = verdict(comparisons(cells))
    assert v["tasks"] == {"a": True, "b": True, "c": False} and v["pays_off"]
    assert verdict_sentence(v).startswith("MAE pretraining pays off in 2 of 3 tasks (a, b): a pretrained ViT "
                                          "(finetune) better than both")
    assert verdict(comparisons(cells), protocol="knn")["tasks"] == {"a": False, "b": False, "c": True}
    nan = paired(cells, {"row": "mae", "protocol": "finetune"}, {"row": "nope", "protocol": "x"}, "auc")
    assert nan["seeds"] == [] and not nan["decided"] and math.isnan(nan["mean"])


def test_a_task_run_with_all_its_labels_only_is_judged_there():
    """The 3-D tasks have one budget, every crop of two training CTs: they are judged there, not skipped as "no"
    (and a task with low budgets still ignores its all-label cells)."""
    good = {("mae", "pretrained", "finetune"): [0.9, 0.91, 0.92], ("rnd", "random", "finetune"): [0.7, 0.71, 0.7],
            ("cnn", "cnn", "scratch"): [0.8, 0.8, 0.81]}
    bad = {**good, ("mae", "pretrained", "finetune"): [0.6, 0.61, 0.62]}
    v = verdict(comparisons(_cells("vol", "classification", "auc", 1, good)))
    assert v["tasks"] == {"vol": True} and v["pays_off"]
    assert verdict_sentence(v).endswith("at every low label budget (all labels where a task has no other).")
    assert verdict(comparisons(_cells("vol", "classification", "auc", 1, bad)))["tasks"] == {"vol": False}
    mixed = _cells("t", "classification", "auc", 8, bad) + _cells("t", "classification", "auc", 1, good)
    assert verdict(comparisons(mixed))["tasks"] == {"t": False}  # the low budget decides, all labels do not
    # per fold and for the primary row: a fold with all labels only still votes beside a fold with low budgets
    folds = [{**c, "family": "f"} for c in _cells("f@a", "classification", "auc", 8, good)
             + _cells("f@b", "classification", "auc", 1, bad)]
    assert verdict(comparisons(folds))["tasks"] == {"f": False}
    # and a lever row's low budgets do not push the primary row (all labels only) out of the judgement
    lever = {("lever", "pretrained", "finetune"): [0.9, 0.91, 0.92]}
    both = [{**c, "primary": True} for c in _cells("p", "classification", "auc", 1, good) if c["role"] == "pretrained"]
    both += [c for c in _cells("p", "classification", "auc", 1, good) if c["role"] != "pretrained"]
    both += [{**c, "primary": False} for c in _cells("p", "classification", "auc", 8, lever)]
    assert verdict(comparisons(both))["tasks"] == {"p": True}


def test_verdict_reads_only_the_primary_pretrained_row():
    """Two pretrained rows: a lever row that wins must not turn the answer (no best-of-n)."""
    cells = []
    for seed in range(5):
        for row, role, primary, auc in (("cnn", "cnn", False, 0.60), ("rand", "random", False, 0.60),
                                        ("mae", "pretrained", True, 0.60 + (0.01, -0.01, 0.02, -0.02, 0.0)[seed]),
                                        ("lever", "pretrained", False, 0.80 + 0.01 * seed)):
            cells.append({"task": "t", "kind": "classification", "fraction": 8, "n_train": 8, "seed": seed,
                          "row": row, "protocol": "scratch" if role == "cnn" else "finetune", "role": role,
                          "backbone": "cnn" if role == "cnn" else "ViT", "pretraining": row, "primary": primary,
                          "metrics": {"auc": auc}})
    comps = comparisons(cells)
    assert {c["a"]["row"] for c in comps if c["a"].get("primary")} == {"mae"}
    assert verdict(comps)["tasks"] == {"t": False}  # the lever beats both, the primary row does not
    for c in cells:
        c.pop("primary")
    with pytest.raises(ValueError, match="none marked primary"):  # best-of-n is refused, not answered
        verdict(comparisons(cells))


def test_no_primary_row_means_no_answer():
    """A table whose only pretrained row is not primary (a pretrained CNN against its scratch twin): no task is
    judged and there is no answer sentence, rather than "0 of 1 tasks show a pretrained ViT"."""
    cells = []
    for seed in range(5):
        for row, role, auc in (("cnn", "cnn", 0.60), ("spark", "pretrained", 0.80 + 0.01 * seed)):
            cells.append({"task": "t", "kind": "classification", "fraction": 8, "n_train": 8, "seed": seed,
                          "row": row, "protocol": "scratch" if role == "cnn" else "finetune", "role": role,
                          "backbone": "ResNet-18", "pretraining": row, "primary": False, "metrics": {"auc": auc}})
    v = verdict(comparisons(cells))
    assert v["tasks"] == {} and v["tasks_total"] == 0 and not v["pays_off"]
    assert verdict_sentence(v) == ""


def test_folds_of_one_task_vote_once():
    """Two folds of a task (one family): it passes only when both folds do; a lone task keeps its own vote."""
    def cells_for(task, family, up):
        out = []
        for seed in range(5):
            for row, role, auc in (("cnn", "cnn", 0.6), ("rand", "random", 0.6),
                                   ("mae", "pretrained", 0.6 + (0.05 + 0.01 * seed if up else (-1) ** seed * 0.01))):
                out.append({"task": task, "family": family, "kind": "classification", "fraction": 8, "n_train": 8,
                            "seed": seed, "row": row, "protocol": "scratch" if role == "cnn" else "finetune",
                            "role": role, "backbone": "cnn" if role == "cnn" else "ViT", "pretraining": row,
                            "primary": role == "pretrained", "metrics": {"auc": auc}})
        return out

    v = verdict(comparisons(cells_for("f@a", "f", True) + cells_for("f@b", "f", False) + cells_for("g", "g", True)))
    assert v["tasks"] == {"f": False, "g": True} and v["tasks_total"] == 2
    v = verdict(comparisons(cells_for("f@a", "f", True) + cells_for("f@b", "f", True)))
    assert v["tasks"] == {"f": True} and v["pays_off"]


def test_a_pretrained_cnn_row_is_judged_against_the_same_cnn_from_scratch():
    """The report's verdict column for a pretrained CNN reads its one baseline (the same CNN from scratch), with the
    interval computed from the cells: yes when it is above zero, no otherwise; a ViT row still needs both."""
    from benchmarks.report import _beats, aggregate

    def table(spark_up: float) -> dict[str, str]:
        cells = []
        for seed in range(5):
            for row, role, bb, proto, auc in (
                    ("cnn", "cnn", "ResNet-18", "scratch", 0.60 + 0.01 * seed),
                    ("spark", "pretrained", "ResNet-18", "finetune", 0.60 + 0.01 * seed + spark_up + 0.002 * seed),
                    ("rand", "random", "ViT", "finetune", 0.50),
                    ("mae", "pretrained", "ViT", "finetune", 0.70 + 0.01 * (seed % 2))):
                cells.append({"task": "t", "kind": "classification", "fraction": 8, "n_train": 8, "seed": seed,
                              "row": row, "protocol": proto, "role": role, "backbone": bb, "pretraining": row,
                              "data": "-", "seconds": 1.0, "primary": row == "mae",
                              "metrics": {"auc": auc, "accuracy": auc, "sensitivity": auc}})
        agg = aggregate(cells)
        _beats(agg, comparisons(cells))
        return {a["row"]: a["verdict"] for a in agg}

    # spark - cnn per seed: 0.050, 0.052, ..., 0.058: mean 0.054, sd 0.00316, t(4) 2.776: [0.0501, 0.0579]
    up = table(0.05)
    assert up["spark"] == "**yes**: +0.054 [+0.050, +0.058] vs ResNet-18 from scratch"
    assert up["mae"].startswith("**yes**")  # the ViT row beats both its baselines here
    down = table(-0.001)  # per seed -0.001, +0.001, ..., +0.007: [-0.0009, +0.0069] includes zero
    assert down["spark"] == "no: +0.003 [-0.001, +0.007] vs ResNet-18 from scratch"
