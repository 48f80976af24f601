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


def test_expert_probe_names_and_provenance(tmp_path):
    """The probe table's expert names and training records, read from the embeddings' expert file and the
    backbone's provenance; a registry name has none."""
    import json

    from benchmarks.medmask_expert_probe import expert_name, provenance

    demo = tmp_path / "demo"
    backbone = tmp_path / "lesion_backbone"
    for folder, source in (("embeddings", str(backbone)), ("embeddings_vit_tiny_patch8", "vit_tiny_patch8")):
        (demo / folder).mkdir(parents=True)
        (demo / folder / "_expert.json").write_text(json.dumps({"source": source, "grid": 4}))
    (demo / "_info.json").write_text(json.dumps({"args": {"expert": "lesion"}}))
    backbone.mkdir()
    (backbone / "config.json").write_text(json.dumps({"provenance": {"data": "external set", "val_dice": 0.4127,
                                                                     "best_epoch": 34}}))
    assert expert_name(demo, "embeddings") == "lesion (the demo's default)"
    assert expert_name(demo, "embeddings_vit_tiny_patch8") == "vit_tiny_patch8"
    assert provenance(demo, "embeddings") == "external set, validation Dice 0.41 (best epoch 34)"
    assert provenance(demo, "embeddings_vit_tiny_patch8") == (
        "`vit_tiny_patch8`: no training record (a registry name is a seeded random init)")
    assert provenance(demo, "embeddings_missing") == "-"
