"""benchmarks/medmask_ablation.py and medmask_cells.py: the config's rows resolve, stage runs are shared where they
should be, the paired comparisons against each row's controls by hand, the report's side-by-side selection rules,
the recipe's hand-over scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import stats
from benchmarks.medmask_ablation import (
    answer,
    choose_default,
    compare,
    controls,
    derived_hand_overs,
    hand_over,
    prefix_rows,
    report,
)
from benchmarks.medmask_cells import demo_argv, stage_key, weights_digest
from medssl.config import load_config, read_yaml
from medssl.detection.config import DEFAULTS

CONFIG = Path("benchmarks/configs/medmask.yaml")


def _cfg(spec: dict, row: dict, rule: str = "best", seed: int = 0) -> dict:
    """A row's config as `run_config` resolves it, without generating the data set."""
    sets = {"data.dataset": "demo", "data.data_root": "/nonexistent", "eval.checkpoint": rule,
            **(spec.get("set") or {}), **(row.get("set") or {}), "seed": seed}
    return load_config(DEFAULTS, Path(spec["recipe"]), [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                                                        for k, v in sets.items()])


def test_config_rows_resolve_and_controls_exist():
    spec = read_yaml(CONFIG.read_text())
    names = [r["name"] for r in spec["rows"]]
    assert len(names) == len(set(names))
    assert len(spec["data_seeds"]) >= 3 and len(spec["seeds"]) >= 3 and spec["selection"] == ["best", "last"]
    assert spec["demo"]["test"] >= 150 and spec["demo"]["calib"] > 0
    assert spec["answer"] and all(a in names and controls(next(r for r in spec["rows"] if r["name"] == a))
                                  for a in spec["answer"])  # the README's rows exist and have a control
    for row in spec["rows"]:
        assert all(c in names for c in controls(row))
        assert set(row.get("selection", spec["selection"])) <= set(spec["selection"])
        cfg = _cfg(spec, row)  # every override is a known key
        assert cfg["train"]["precision"] == "fp32"
        assert cfg["cross_domain_mae"]["epochs"] == 2 and cfg["teaching"]["epochs"] == 4  # the recipe's schedule
    rows = {r["name"]: r for r in spec["rows"]}
    adabn = _cfg(spec, rows["AdaBN control (target forward, no loss)"])["cross_domain_mae"]
    assert adabn["target_forward"] and adabn["mae_weight"] == 0 and adabn["distill_weight"] == 0
    oracle = _cfg(spec, rows["oracle (source + target labels)"])
    longest = max(sum(_cfg(spec, r)[s]["epochs"] for s in r["stages"]) for r in spec["rows"] if r["stages"]
                  and "oracle" not in r["name"])
    assert oracle["data"]["train_split"] == ["train", "target_truth"] and oracle["source_only"]["epochs"] == longest
    medmask = _cfg(spec, rows["+ distillation (medmask reference)"])
    assert medmask["distill"]["mode"] == "medmask" and medmask["distill"]["margin"] is None  # the mode's 1
    assert medmask["cross_domain_mae"]["distill_weight"] == 1
    no_pl = _cfg(spec, rows["stage 3 without pseudo-labels (weight 0)"])["teaching"]
    assert no_pl["pseudo_weight"] == 0 and {k: v for k, v in no_pl.items() if k != "pseudo_weight"} == {
        k: v for k, v in _cfg(spec, rows["stage 3 (teaching)"])["teaching"].items() if k != "pseudo_weight"}
    frozen = _cfg(spec, rows["source_only + 2 epochs, BN statistics frozen"])["cross_domain_mae"]
    assert frozen["freeze_bn"] and frozen["mae_weight"] == 0 and frozen["distill_weight"] == 0
    for name in ("+ feature MAE, BN statistics frozen", "stage 2, BN statistics frozen"):  # frozen against frozen
        assert rows[name]["control"] == "source_only + 2 epochs, BN statistics frozen"


def test_demo_argv_parses_as_the_generator_arguments():
    import argparse

    from data_tools import demo_mammo

    argv = demo_argv({"demo": {"test": 160, "calib": 100}}, 2)
    assert argv == ["--test", "160", "--calib", "100", "--seed", "2"]
    p = argparse.ArgumentParser()
    demo_mammo.add_arguments(p)
    a = p.parse_args(argv)
    assert (a.seed, a.test, a.calib, a.train) == (2, 160, 100, 200)
    assert demo_argv({}, None) is None


def test_stage_runs_shared_across_rules_and_distillation_modes():
    spec = read_yaml(CONFIG.read_text())
    rows = {r["name"]: r for r in spec["rows"]}
    so = ["source_only"]
    s2 = ["source_only", "cross_domain_mae"]
    keys = {(name, rule): stage_key(_cfg(spec, rows[name], rule), so, "f")
            for name in ("source_only", "+ distillation (medmask reference)", "+ distillation (object-level)",
                         "stage 2 (MAE + distillation)") for rule in ("best", "last")}
    assert len(set(keys.values())) == 1  # one source_only run feeds every row and both rules
    assert stage_key(_cfg(spec, rows["oracle (source + target labels)"]), so, "f") != keys[("source_only", "best")]
    stage2 = {(rule, handed): stage_key(_cfg(spec, rows["stage 2 (MAE + distillation)"], rule), s2, "f", handed)
              for rule in ("best", "last") for handed in ("w1", "w2")}
    assert stage2[("best", "w1")] == stage2[("last", "w1")]  # the same weights handed on: one run for both rules
    assert stage2[("best", "w1")] != stage2[("best", "w2")]  # other weights: another run
    modes = {stage_key(_cfg(spec, rows[n]), s2, "f", "w") for n in ("+ distillation", "+ distillation (medmask "
                                                                    "reference)", "+ distillation (object-level)")}
    assert len(modes) == 3


def test_weights_digest_reads_the_weights_not_the_file(tmp_path):
    import torch

    from medssl.train.checkpoint import save_checkpoint

    w = {"a": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    save_checkpoint(tmp_path / "best.pt", {"model": w, "mae": {}, "distiller": None, "epoch": 3, "metrics": {"x": 1.0}})
    save_checkpoint(tmp_path / "last.pt", {"model": dict(w), "mae": {}, "distiller": None, "epoch": 3, "metrics": {}})
    assert weights_digest(tmp_path / "best.pt") == weights_digest(tmp_path / "last.pt")
    w2 = {**w, "a": w["a"].clone()}
    w2["a"][1, 2] = 5.000001
    save_checkpoint(tmp_path / "other.pt", {"model": w2, "mae": {}, "distiller": None})
    assert weights_digest(tmp_path / "other.pt") != weights_digest(tmp_path / "best.pt")
    save_checkpoint(tmp_path / "shape.pt", {"model": {**w, "a": w["a"].reshape(3, 2)}, "mae": {}, "distiller": None})
    assert weights_digest(tmp_path / "shape.pt") != weights_digest(tmp_path / "best.pt")


def _cells(values: dict[tuple[str, int, int, str], float]) -> dict:
    return {k: {"summary": {"R@0.3": v}} for k, v in values.items()}


def test_compare_pairs_each_row_with_its_control_by_hand():
    rows = [{"name": "ctrl"}, {"name": "mae", "control": "ctrl"}]
    v = {}
    for rule, shift in (("best", 0.0), ("last", 0.05)):
        for g in (0, 1):
            for s in (0, 1):
                v[("ctrl", g, s, rule)] = 0.1 * g + 0.01 * s
                v[("mae", g, s, rule)] = v[("ctrl", g, s, rule)] + [0.1, 0.2, 0.0, 0.1][2 * g + s] + shift
    out = compare(rows, _cells(v))
    assert [(c["rule"], c["unit"]) for c in out] == [("best", "run"), ("best", "set"), ("last", "run"), ("last", "set")]
    run = out[0]
    diffs = [0.1, 0.2, 0.0, 0.1]  # (set, seed) = (0, 0), (0, 1), (1, 0), (1, 1)
    assert run["diffs"] == pytest.approx(diffs) and run["seeds"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert run["mean"] == pytest.approx(0.1)
    half = 3.182446305284263 * np.std(diffs, ddof=1) / 2  # t(0.975, 3) x sd / sqrt(4)
    assert run["ci"] == pytest.approx([0.1 - half, 0.1 + half])
    assert (run["up"], run["down"], run["p_sign"]) == (3, 0, 0.25)
    per_set = out[1]
    assert per_set["seeds"] == [0, 1] and per_set["diffs"] == pytest.approx([0.15, 0.05])
    assert per_set["ci"] == pytest.approx(stats.t_interval([0.15, 0.05]))
    assert out[2]["mean"] == pytest.approx(0.15)
    # a row missing seed 1 of set 1: that set's means pair the seeds both rows have (seed 0 only: diff 0.0)
    partial = compare(rows, _cells({k: x for k, x in v.items() if k != ("mae", 1, 1, "best")}))
    assert partial[1]["diffs"] == pytest.approx([0.15, 0.0]) and len(partial[0]["seeds"]) == 3
    one_set = compare(rows, _cells({k: x for k, x in v.items() if k[1] == 0}))
    assert [c["unit"] for c in one_set] == ["run", "run"]  # no set-level unit with a single set


def test_hand_over_counts_runs_below_the_control_by_hand():
    """final.pt held stage 2 in two runs (difference 0 by construction) and teaching in two (one above, one below
    stage 2): one of four runs below, smallest difference -0.1; the README line carries it under the row's
    comparison. A run whose control is missing is left out."""
    rows = [{"name": "stage 2", "stages": ["source_only", "cross_domain_mae"]},
            {"name": "final", "hand_over": True, "control": "stage 2"}]
    v = {("stage 2", 1, 0, "best"): 0.5, ("stage 2", 1, 1, "best"): 0.4, ("stage 2", 2, 0, "best"): 0.6,
         ("stage 2", 2, 1, "best"): 0.3}
    held = {(1, 0): ("cross_domain_mae", 0.5), (1, 1): ("teaching", 0.3), (2, 0): ("cross_domain_mae", 0.6),
            (2, 1): ("teaching", 0.45), (3, 0): ("teaching", 0.2)}
    cells = _cells(v)
    for (g, s), (stage, r) in held.items():
        cells[("final", g, s, "best")] = {"summary": {"R@0.3": r}, "handed_stage": stage}
    comps = compare(rows, cells)
    (h,) = hand_over(rows, cells, comps)
    assert [(x["set"], x["seed"], x["handed"]) for x in h["runs"]] == [
        (1, 0, "cross_domain_mae"), (1, 1, "teaching"), (2, 0, "cross_domain_mae"), (2, 1, "teaching")]
    assert [x["diff"] for x in h["runs"]] == pytest.approx([0.0, -0.1, 0.0, 0.15])
    assert (h["below"], h["handed"]) == (1, {"cross_domain_mae": 2, "teaching": 2})
    assert h["worst"] == pytest.approx(-0.1)
    meta = {"data_seeds": [1, 2], "seeds": 2, "split": "test"}
    lines = answer(comps, ["final"], meta, [h])
    assert lines[-1] == ("  `final` vs stage 2 (target validation (reference)): final.pt held cross_domain_mae in 2, "
                         "teaching in 2 of 4 runs; R@0.3 below it in 1 of 4 (smallest difference -0.100) (in the 2 "
                         "runs where it held stage 2's own checkpoint the difference is 0 by construction).")
    assert lines[-2].startswith("- **final** vs stage 2: target validation (reference): ")


def test_derived_hand_over_by_hand():
    """final.pt of each teaching row from the cells: its chain's earlier stages are the rows that train them with
    its overrides minus the teaching ones; the stage best on validation (ties to the earlier) gives the figures.
    A teaching row whose stage 2 has no row of its own gets none."""
    rows = [{"name": "so", "stages": ["source_only"]},
            {"name": "s2", "stages": ["source_only", "cross_domain_mae"]},
            {"name": "s2 lesion", "stages": ["source_only", "cross_domain_mae"], "expert": "lesion"},
            {"name": "t", "stages": ["source_only", "cross_domain_mae", "teaching"]},
            {"name": "t mrt", "stages": ["source_only", "cross_domain_mae", "teaching"],
             "set": {"teaching.threshold": "mrt"}},
            {"name": "t frozen", "stages": ["source_only", "cross_domain_mae", "teaching"],
             "set": {"cross_domain_mae.freeze_bn": True}},
            {"name": "t lesion", "stages": ["source_only", "cross_domain_mae", "teaching"], "expert": "lesion"}]
    assert prefix_rows(rows, rows[4]) == ["so", "s2"] and prefix_rows(rows, rows[5]) is None
    assert prefix_rows(rows, rows[6]) == ["so", "s2 lesion"]  # stage 2 distilled from the same expert
    rows = rows[:6]

    def cell(val: float, test: float) -> dict:
        return {"summary": {"R@0.3": test}, "val_best": {"R@0.3": val}}

    cells = {("so", 1, 0, "best"): cell(0.2, 0.3), ("s2", 1, 0, "best"): cell(0.5, 0.6),
             ("t", 1, 0, "best"): cell(0.5, 0.4), ("t mrt", 1, 0, "best"): cell(0.7, 0.65),
             ("t", 1, 0, "last"): cell(0.9, 0.9)}
    new_rows, derived = derived_hand_overs(rows, cells)
    assert [(r["name"], r["control"]) for r in new_rows] == [("final.pt of t", "s2"), ("final.pt of t mrt", "s2")]
    assert derived == {  # "t": a tie on validation, the earlier stage 2; "t mrt": teaching, best on validation
        ("final.pt of t", 1, 0, "best"): {**cells[("s2", 1, 0, "best")], "handed_stage": "cross_domain_mae"},
        ("final.pt of t mrt", 1, 0, "best"): {**cells[("t mrt", 1, 0, "best")], "handed_stage": "teaching"}}


def test_derived_hand_over_agrees_with_the_trained_one_in_the_committed_cells():
    """In every committed run of the ablation, the hand-over read from the cells is the checkpoint the recipe's
    hand-over row scored by training: the same stage and the same test figures."""
    spec = read_yaml(CONFIG.read_text())
    cells = {}
    for f in Path("benchmarks/results/medmask/cells").glob("*.json"):
        c = json.loads(f.read_text())
        if c.get("data_seed") is not None and c.get("row") in {r["name"] for r in spec["rows"]}:
            cells[(c["row"], c["data_seed"], c["seed"], c["rule"])] = c
    rows, derived = derived_hand_overs(spec["rows"], cells, trained_too=True)
    assert "final.pt of stage 3 (teaching)" not in {r["name"] for r in derived_hand_overs(spec["rows"], cells)[0]}
    assert "final.pt of stage 3, MRT dynamic threshold" in {r["name"] for r in rows}
    trained = {k[1:]: c for k, c in cells.items() if k[0] == "recipe hand-over (final.pt)"}
    if not trained:
        pytest.skip("no committed hand-over cells")
    for run, c in trained.items():
        d = derived[("final.pt of stage 3 (teaching)", *run)]
        assert (d["handed_stage"], d["summary"]) == (c["handed_stage"], c["summary"])


def test_teaching_default_rule_by_hand():
    """Means over the runs every candidate has (a candidate's extra run is left out); the highest wins only by more
    than the margin; the config's rule names rows of the config."""
    rule = {"current": "t", "margin": 0.01, "candidates": ["t", "mrt", "keep"]}
    v = {("t", 1, 0, "best"): 0.6, ("t", 1, 1, "best"): 0.6, ("mrt", 1, 0, "best"): 0.61,
         ("mrt", 1, 1, "best"): 0.6, ("keep", 1, 0, "best"): 0.5, ("keep", 1, 1, "best"): 0.6,
         ("keep", 2, 0, "best"): 0.9, ("keep", 1, 0, "last"): 0.9, ("other", 1, 0, "best"): 0.99}
    c = choose_default(_cells(v), rule)
    assert (c["chosen"], c["runs"]) == ("t", 2) and c["means"] == pytest.approx({"t": 0.6, "mrt": 0.605, "keep": 0.55})
    v[("keep", 1, 0, "best")] = 0.64
    assert choose_default(_cells(v), rule)["chosen"] == "keep"  # 0.62 > 0.6 + 0.01
    assert choose_default(_cells({k: x for k, x in v.items() if k[0] != "mrt"}), rule) is None  # no common run
    assert choose_default(_cells(v), None) is None
    spec = read_yaml(CONFIG.read_text())
    names = {r["name"] for r in spec["rows"]}
    assert spec["teaching_default"]["current"] in spec["teaching_default"]["candidates"]
    assert set(spec["teaching_default"]["candidates"]) <= names


def test_report_puts_rules_side_by_side_and_the_comparisons():
    entry = {"R@0.3": (0.5, 0.1), "mean_sensitivity": (0.4, 0.1), "AP50": (0.2, 0.0), "seeds": 4}
    tables = {"best": [{"row": "ctrl", **entry}, {"row": "mae", **entry, "R@0.3": (0.6, 0.1)}],
              "last": [{"row": "ctrl", **entry, "R@0.3": (0.45, 0.05)}, {"row": "mae", **entry}]}
    comps = [{"row": "mae", "control": "ctrl", "rule": "best", "unit": "run", "metric": "R@0.3", "seeds": [[0, 0]] * 4,
              "mean": 0.1, "ci": [0.02, 0.18], "decided": True, "up": 4, "down": 0, "p_sign": 0.125}]
    meta = {"test_images": "160", "test_lesions": "79-81", "minutes": 1.0, "machine": "CPU", "seeds": 3,
            "data_seeds": [0, 1, 2], "command": "python benchmarks/medmask_ablation.py"}
    set_level = {**comps[0], "unit": "set", "seeds": [0, 1], "ci": [-0.5, 0.7], "decided": False, "up": 2,
                 "p_sign": 0.5}
    # two of the three sets asked have results so far: the text counts the sets compared
    partial = "\n".join(report(tables["best"], meta, tables, [*comps, set_level]))
    assert "1 degree of freedom with 2 sets; its sign test cannot go below p = 0.5)" in partial
    comps.append({**set_level, "seeds": [0, 1, 2], "up": 3, "p_sign": 0.25})
    text = "\n".join(report(tables["best"], meta, tables, comps))
    assert text.startswith("MedMask ablation on the target-domain test split (per generated set 160 images, 79-81 "
                           "lesions; 3 sets x 3 seeds), CPU demo scale")
    assert "| ctrl | 0.500 +- 0.100 (n 4) | 0.450 +- 0.050 (n 4) |" in text
    assert "2 degrees of freedom with 3 sets; its sign test cannot go below p = 0.25)" in text
    assert "| mae | 0.600 +- 0.100 (n 4) | 0.500 +- 0.100 (n 4) |" in text
    assert ("| mae | ctrl | target validation (reference) | run | 4 | +0.100 (**better**) | [+0.020, +0.180] | "
            "4 / 0 | 0.12 |") in text


def test_report_gives_rows_that_share_teaching_runs_one_pseudo_label_line():
    """The hand-over row reads the same teaching runs as stage 3: their pseudo-label history is printed once,
    naming both; a row with its own history gets its own line."""
    entry = {"R@0.3": (0.5, 0.1), "mean_sensitivity": (0.4, 0.1), "AP50": (0.2, 0.0), "seeds": 4}
    shared = [{"pseudo_precision": [0.25, 0.0, 4], "pseudo_recall": [0.5, 0.0, 4], "pseudo_per_image": [1.5, 0.0, 4]}]
    own = [{**shared[0], "pseudo_per_image": [3.0, 0.0, 4]}]
    table = [{"row": "stage 3", **entry, "pseudo_labels": shared},
             {"row": "hand-over", **entry, "pseudo_labels": shared},
             {"row": "weight 0", **entry, "pseudo_labels": own}, {"row": "stage 2", **entry}]
    meta = {"test_images": "160", "test_lesions": "80", "minutes": 1.0, "machine": "CPU", "seeds": 4,
            "command": "python benchmarks/medmask_ablation.py"}
    lines = [x for x in report(table, meta) if x.startswith("Pseudo-labels")]
    assert lines == [
        "Pseudo-labels of `stage 3` and `hand-over` against the target pool's true boxes (IoU >= 0.5), per teaching "
        "epoch: epoch 0: precision 0.25, recall 0.50, 1.50 per image.",
        "Pseudo-labels of `weight 0` against the target pool's true boxes (IoU >= 0.5), per teaching epoch: epoch 0: "
        "precision 0.25, recall 0.50, 3.00 per image."]


def test_main_end_to_end_tiny(tmp_path):
    """The whole protocol at toy scale: two generated sets (with a calibration split), one seed, both selection
    rules, a control; cells, tables, comparisons and the report written; a re-run reads every cell back."""
    import yaml

    from benchmarks import medmask_ablation
    from benchmarks.speed import cpu_flags
    from tests.detection.conftest import TINY

    tiny = dict(s.split("=", 1) for s in TINY)
    tiny = {k: json.loads(v) if v.startswith("[") else v for k, v in tiny.items()}
    spec = {"recipe": "recipes/configs/medmask_demo.yaml", "data_root": str(tmp_path / "data"), "data_seeds": [0, 1],
            "seeds": [0], "selection": ["best", "last"],
            "demo": {"train": 4, "val": 3, "test": 2, "target": 3, "calib": 2, "height": 64, "width": 64,
                     "abnormal_frac": 0.7, "expert": "vit_tiny_patch16", "embed_size": 32, "embed_grid": 2},
            "set": {**tiny, "teaching.epochs": 1},
            "rows": [{"name": "source_only", "stages": ["source_only"]},
                     {"name": "AdaBN", "stages": ["source_only", "cross_domain_mae"], "control": "source_only",
                      "set": {"cross_domain_mae.mae_weight": 0, "cross_domain_mae.distill_weight": 0,
                              "cross_domain_mae.target_forward": True}},
                     {"name": "hand-over", "stages": ["source_only", "cross_domain_mae"], "hand_over": True,
                      "selection": ["best"], "control": ["source_only", "AdaBN"],
                      "set": {"cross_domain_mae.mae_weight": 0, "cross_domain_mae.distill_weight": 0,
                              "cross_domain_mae.target_forward": True}}]}
    config = tmp_path / "spec.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert medmask_ablation.main(["--config", str(config), "--out", str(out)]) == 0
    for g in (0, 1):
        info = json.loads((tmp_path / "data" / f"seed{g}" / "demo" / "_info.json").read_text())
        assert info["args"]["seed"] == g and info["images"]["calib"] == 2
    result = json.loads((out / "results.json").read_text())
    assert set(result["tables"]) == {"best", "last"} and all(e["seeds"] == 2 for t in result["tables"].values()
                                                              for e in t)
    assert [e["row"] for e in result["tables"]["last"]] == ["source_only", "AdaBN"]  # hand-over: best only
    assert [(c["row"], c["control"], c["rule"], c["unit"]) for c in result["comparisons"]] == [
        ("AdaBN", "source_only", "best", "run"), ("AdaBN", "source_only", "best", "set"),
        ("AdaBN", "source_only", "last", "run"), ("AdaBN", "source_only", "last", "set"),
        ("hand-over", "source_only", "best", "run"), ("hand-over", "source_only", "best", "set"),
        ("hand-over", "AdaBN", "best", "run"), ("hand-over", "AdaBN", "best", "set")]
    assert len(list((out / "cells").glob("*.json"))) == 2 * 2 * 2 + 2
    # source_only trained once per set (both rules); stage 2 once per set and distinct weights handed into it
    # (source_only's best.pt and last.pt hold the same weights when its best epoch is its last)
    so = sorted((out / "stages").glob("*/source_only"))
    assert len(so) == 2 and all((d / "metrics.json").is_file() for d in so)
    handed = sum(len({weights_digest(d / "best.pt"), weights_digest(d / "last.pt")}) for d in so)
    assert sum(1 for p in (out / "stages").glob("*/cross_domain_mae/metrics.json")) == handed
    assert handed == 2  # one source_only epoch here: its best epoch is its last, so best and last share stage 2
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert all(c["cpu_flags"] == cpu_flags() for c in cells)  # where each cell ran, counted in the report
    assert result["meta"]["cells_by_cpu"] == {medmask_ablation._by_cpu([cells[0]]).popitem()[0]: len(cells)}
    by_hand = [{"cpu_flags": ["avx2"], "threads": 1}] * 2 + [{"cpu_flags": ["avx2"], "threads": 2}, {"summary": {}}]
    kinds = medmask_ablation._by_cpu(by_hand)
    assert kinds == {"-": 1, "avx2/1": 2, "avx2/2": 1}
    assert medmask_ablation._machines({"cells_by_cpu": kinds}) == (
        "; cells computed on unrecorded CPUs: 1, AVX2 CPUs at 1 thread: 2, AVX2 CPUs at 2 threads: 1")
    last = [c for c in cells if c["row"] == "source_only" and c["rule"] == "last"]
    assert all(c["stage_dir"].endswith("source_only") for c in last)
    from medssl.detection.stages import handed_stage

    def cell(row: str, g: int) -> dict:
        return next(x for x in cells if (x["row"], x["rule"], x["data_seed"]) == (row, "best", g))

    for g in (0, 1):  # the stage final.pt would hold, scored: the same figures as that stage's own row
        c, rows = cell("hand-over", g), {"source_only": cell("source_only", g), "cross_domain_mae": cell("AdaBN", g)}
        bests = {s: json.loads((Path(r["stage_dir"]) / "metrics.json").read_text())["best"] for s, r in rows.items()}
        assert c["handed_stage"] == handed_stage(bests, list(bests), "R@0.3", "best")
        assert c["summary"] == rows[c["handed_stage"]]["summary"]
    # the hand-over's runs against each control, with the stage each held: as the cells say
    assert [(h["control"], [(r["set"], r["handed"]) for r in h["runs"]]) for h in result["hand_over"]] == [
        (control, [(g, cell("hand-over", g)["handed_stage"]) for g in (0, 1)]) for control in ("source_only", "AdaBN")]
    text = (out / "results.md").read_text()
    assert "`hand-over` vs AdaBN (target validation (reference)): final.pt held" in text
    assert "none (last epoch)" in text and "| AdaBN | source_only |" in text
    assert medmask_ablation.main(["--config", str(config), "--out", str(out), "--report"]) == 0
    assert json.loads((out / "results.json").read_text())["tables"] == result["tables"]
    stage_runs = sorted((out / "stages").glob("*/*/metrics.json"))
    assert medmask_ablation.main(["--config", str(config), "--out", str(out), "--split", "calib"]) == 0
    calib = json.loads((tmp_path / "out_calib" / "results.json").read_text())
    assert calib["meta"]["split"] == "calib" and calib["meta"]["test_images"] == "2"
    assert sorted((out / "stages").glob("*/*/metrics.json")) == stage_runs  # scored only: no stage retrained
    assert not (tmp_path / "out_calib" / "stages").exists()
    # an expert row read for a report names its embeddings folder and makes nothing; a run makes it: same config
    row = {"name": "other expert", "stages": ["source_only"], "expert": "vit_tiny_patch16"}
    folder = tmp_path / "data" / "seed0" / "demo" / "embeddings_vit_tiny_patch16"
    named = medmask_ablation._report_config(spec, row, 0, 0, "best")
    assert not folder.exists()
    assert medmask_ablation.run_config(spec, row, 0, 0, "best") == named and (folder / "manifest.jsonl").is_file()
