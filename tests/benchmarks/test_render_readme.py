"""docs/ figures rendered from result files (render_readme); bf16 skipped where the CPU has no native bf16."""

from __future__ import annotations

import json

import pytest

from benchmarks.render_readme import BEGIN, END, main, render, replace_section
from benchmarks.speed import bf16_plan

MACHINE = {"date": "2026-12-02 06:00 UTC", "cpu": "Test CPU", "cpus": 2, "cpu_flags": ["avx2"], "native_bf16": False,
           "torch": "2.14.1", "threads": 2, "commit": "abc1234", "dirty": False, "gpu": None, "device": "cpu"}
ROW = {"bench": "ms_deform_attn_fwd_bwd", "case": "encoder", "img": 800, "queries": 13294, "tokens": 13294,
       "device": "cpu", "threads": 2, "rounds": 9, "memory_kind": "saved_for_backward",
       "ours_s": 1.5, "hf_s": 3.0, "ours_mem_mb": 34.0, "hf_mem_mb": 240.0, "time_speedup_vs_hf": 2.0,
       "time_speedup_vs_hf_ci95": [1.5, 2.5], "time_faster_rounds_vs_hf": 9, "cpu_speedup_vs_hf": 2.25,
       "cpu_speedup_vs_hf_ci95": [2.0, 2.5], "mem_ratio_vs_hf": 34.0 / 240.0}


def test_render_states_machine_and_every_figure():
    text = render({"machine": MACHINE, "command": "python benchmarks/speed.py --only detection",
                   "detection": [ROW]}, "res.json")
    assert "Test CPU, 2 CPUs, flags avx2 (native bf16: no)" in text and "commit abc1234" in text
    assert text.startswith("`res.json`: measured 2026-12-02")
    row = next(line for line in text.splitlines() if line.startswith("| 800 px"))
    assert row == ("| 800 px | encoder (13,294) | 1500.0 ms | 3000.0 ms | 2.00x [1.50, 2.50] | 9/9 | "
                   "2.25x [2.00, 2.50] | 34.0 vs 240.0 MB (0.14x) |")


def test_replace_section_keeps_the_rest(tmp_path):
    text = f"intro\n{BEGIN}\nold figures\n{END}\nafter\n"
    assert replace_section(text, "new\n") == f"intro\n{BEGIN}\nnew\n{END}\nafter\n"
    with pytest.raises(ValueError, match="speed:begin"):
        replace_section("no markers", "x")
    readme, res = tmp_path / "README.md", tmp_path / "speed.json"
    readme.write_text(text)
    res.write_text(json.dumps({"machine": MACHINE, "detection": [ROW]}))
    assert main([str(res), "--readme", str(readme)]) == 0
    out = readme.read_text()
    assert out.startswith(f"intro\n{BEGIN}\n`{res}`: measured 2026-12-02") and out.endswith(f"{END}\nafter\n")
    assert "2.00x [1.50, 2.50]" in out and "old figures" not in out
    res.write_text("{not json")
    assert main([str(res), "--readme", str(readme)]) == 2 and readme.read_text() == out


def test_bf16_plan_skips_without_native_bf16():
    run, why = bf16_plan("auto", MACHINE)
    assert not run and "no native bf16" in why and "avx2" in why
    run, why = bf16_plan("auto", {**MACHINE, "cpu_flags": ["avx2", "amx_bf16"], "native_bf16": True})
    assert run and "native bf16" in why
    assert bf16_plan("on", MACHINE)[0] and not bf16_plan("off", MACHINE)[0]


def test_bf16_curve_compare_and_render():
    """The gap figures of two logged loss curves, hand-computed, and their README line."""
    from benchmarks.bf16_curve import compare

    fp32 = ([10, 20, 30], [1.0, 0.5, 0.4], [10.0, 10.0])
    bf16 = ([10, 20, 30], [1.1, 0.45, 0.4], [20.0, 30.0])
    r = compare(fp32, bf16)
    assert r["steps"] == [10, 20, 30]
    assert r["max_abs_rel_gap"] == pytest.approx(0.1)
    assert r["mean_rel_gap"] == pytest.approx((0.1 - 0.1 + 0.0) / 3)
    assert r["final_loss_fp32"] == 0.4 and r["final_rel_gap"] == 0.0  # the last fifth: one point
    assert r["bf16_speedup"] == pytest.approx(2.5)
    text = render({"machine": MACHINE, "epochs": 5, "compare": r}, "curve.json")
    assert "final loss 0.4000 (bf16) vs 0.4000 (fp32), +0.00%; largest gap at a logged step 10.00%" in text
    assert "25 vs 10 images/s (2.50x)" in text


def test_demo_and_ablation_sections(tmp_path):
    """A MedMask summary.json and an ablation table rendered into their own markers."""
    from benchmarks.medmask_ablation import aggregate
    from benchmarks.render_readme import render_ablation, render_demo

    summary = {"random_boxes": {"R@0.3": 0.0, "AP50": 0.0}, "source_only": {"R@0.3": 0.5, "AP50": 0.125},
               "test": {"random_boxes": {"R@0.3": 0.0, "AP50": 0.0}, "source_only": {"R@0.3": 0.25, "AP50": 0.1}}}
    text = render_demo(summary, "s.json")
    assert "| source only | 0.500 | 0.125 | 0.250 | 0.100 |" in text and "| random boxes | 0.000" in text
    rows = [{"name": "source_only"}, {"name": "teaching"}]
    cell = {"summary": {"R@0.3": 0.4, "mean_sensitivity": 0.5, "AP50": 0.1}, "froc_grid": [0.0, 1.0]}
    cells = {("source_only", 0): cell,
             ("source_only", 1): {**cell, "summary": {"R@0.3": 0.6, "mean_sensitivity": 0.7, "AP50": 0.3}},
             ("teaching", 0): {**cell, "pseudo_labels": [{"pseudo_precision": 0.5, "pseudo_recall": 0.25,
                                                          "pseudo_per_image": 1.0}]}}
    table = aggregate(rows, cells, [0, 1])
    assert table[0]["R@0.3"] == pytest.approx((0.5, 0.1414213562)) and table[0]["seeds"] == 2
    assert table[1]["seeds"] == 1 and table[1]["pseudo_labels"][0]["pseudo_precision"] == (0.5, 0.0)
    meta = {"test_images": 60, "test_lesions": 29, "seeds": 2, "minutes": 12.0, "machine": "Test CPU",
            "command": "python benchmarks/medmask_ablation.py", "commit": "abc1234", "date": "2026-12-02"}
    text = render_ablation({"table": table, "meta": meta}, "results.json")
    assert "| source_only | 2 | 0.500 +- 0.141 | 0.600 +- 0.141 | 0.200 +- 0.141 |" in text
    assert "epoch 0: precision 0.50, recall 0.25, 1.00 per image" in text and "froc.png" in text


def test_ablation_section_adds_probe(tmp_path):
    """The expert probes, when written beside results.json, follow the ablation table, before the FROC plot."""
    import json

    from benchmarks.render_readme import render_ablation

    meta = {"test_images": 60, "test_lesions": 29, "seeds": 1, "minutes": 1.0, "machine": "Test CPU",
            "command": "python benchmarks/medmask_ablation.py", "commit": "abc1234", "date": "2026-12-02"}
    result = {"table": [], "meta": meta}
    bare = render_ablation(result, str(tmp_path / "results.json"))
    assert "Ridge probes" not in bare
    (tmp_path / "expert_probe.json").write_text(json.dumps([
        {"expert": "lesion", "set": "seed1", "folder": "embeddings_lesion", "density_r2": 0.755, "lesion_auc": 0.5,
         "trained_on": "x", "vendor_auc": 0.9, "images": 260, "region_auc": 0.875, "region_ci": [0.8, 0.95],
         "pixel_auc": 0.625, "regions": 320, "lesions": 80}]))
    text = render_ablation(result, str(tmp_path / "results.json"))
    assert "| lesion | seed1 | 0.76 | 0.50 | 0.90 | 0.88 [0.80, 0.95] | 0.62 | 80 (320) | x |" in text
    assert text.index("expert_probe.json") < text.index("froc.png")


def test_medmask_answer_by_hand():
    """The README's MedMask lines: each asked row against each control, per selection rule, at the set level, with
    the sets and runs each rests on; rows not asked and run-level lines are left out."""
    from benchmarks.render_readme import render_medmask_answer

    def comp(row, control, rule, unit, mean, ci, n):
        return {"row": row, "control": control, "rule": rule, "unit": unit, "metric": "R@0.3", "mean": mean,
                "ci": ci, "decided": ci[0] > 0 or ci[1] < 0, "seeds": list(range(n))}

    comps = [comp("+ MAE", "AdaBN", "best", "run", 0.1, [0.05, 0.15], 9),
             comp("+ MAE", "AdaBN", "best", "set", 0.1, [0.02, 0.18], 3),
             comp("+ MAE", "AdaBN", "last", "run", -0.01, [-0.2, 0.1], 5),
             comp("+ MAE", "AdaBN", "last", "set", -0.01, [-0.3, 0.2], 2),
             comp("teach", "stage 2", "best", "run", -0.2, [-0.3, -0.1], 9),
             comp("teach", "stage 2", "best", "set", -0.2, [-0.3, -0.1], 3),
             comp("other", "AdaBN", "best", "set", 0.5, [0.4, 0.6], 3)]
    meta = {"data_seeds": [1, 2, 3], "seeds": 3, "answer": ["+ MAE", "teach"], "commit": "abc", "date": "d",
            "minutes": 90.0, "split": "test"}
    text = render_medmask_answer({"meta": meta, "comparisons": comps}, "r.json")
    assert text.splitlines() == [
        "`r.json` (commit abc, d, 1.5 h of training summed over the cells' run times):", "",
        "Difference in R@0.3 on the target test split, row minus its control, over the generated sets' means (the "
        "interval that covers a new set), 95% t-interval, per model-selection rule; each line is one test at 95% "
        "with no correction for their number:", "",
        "- **+ MAE** vs AdaBN: target validation (reference): +0.100 [+0.020, +0.180], **better** (over 3 of 3 sets, 9 "
        "of 9 runs); none (last epoch): -0.010 [-0.300, +0.200], no difference shown (over 2 of 3 sets, 5 of 9 runs).",
        "- **teach** vs stage 2: target validation (reference): -0.200 [-0.300, -0.100], **worse** (over 3 of 3 sets, "
        "9 of 9 runs)."]


def test_every_section_is_in_its_page():
    """Each section's markers are in the page render_readme writes it to, once, and nowhere else."""
    from pathlib import Path

    from benchmarks.render_readme import TARGETS

    root = Path(__file__).resolve().parents[2]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for section, target in TARGETS.items():
        holders = [p for p in pages if f"<!-- {section}:begin -->" in p.read_text()]
        assert holders == [root / target], (section, holders)


def test_mae_runs_and_build_tables():
    """speed.py's MAE runs side by side and bench_build.py's table, from hand-made rows."""
    from benchmarks.bench_build import report
    from benchmarks.render_readme import render_table

    def peer(med: float, mem: float) -> dict:
        return {"config": "demo_cpu_tiny8_64", "impl": "hf", "medssl_speedup_median": med,
                "medssl_speedup_ci95": [med - 0.1, med + 0.1], "medssl_faster_rounds": 9, "rounds": 15,
                "model_speedup_median": med - 0.01, "peak_mem_mb": mem}

    runs = [{"mae": [{"config": "demo_cpu_tiny8_64", "impl": "medssl", "images_per_s": ips, "peak_mem_mb": 250.0},
                     peer(med, 300.0)]} for ips, med in ((98.5, 1.05), (106.7, 1.0))]
    text = render_table({"transcribed": "by hand", "runs": runs}, "runs.json")
    assert text.startswith("`runs.json`: by hand.\n")
    assert ("| CPU demo, ViT-Ti/8, 64, decoder 128 x 2 | HF `ViTMAEForPreTraining` | 1.050x [0.950, 1.150], 9/15 | "
            "1.000x [0.900, 1.100], 9/15 | 1.040x / 0.990x | 250 vs 300 MB / 250 vs 300 MB |") in text
    assert "run 1 / run 2: CPU demo 98.5 / 106.7." in text
    rows = [{"input": "dicom", "what": "DICOM: x", "workers": w, "samples": 160, "wall_s": 9.71, "cpu_s": 5.9,
             "samples_per_s": 160 / 9.71, "samples_per_cpu_s": 160 / 5.9} for w in (1, 2)]
    assert report({"rows": rows})[2:] == ["| DICOM: x | 1 | 160 | 9.7 | 5.9 | 16.5 | 27.1 |",
                                          "| | 2 | 160 | 9.7 | 5.9 | 16.5 | 27.1 |"]
