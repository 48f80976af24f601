"""run_all's detection task: MedMask cells on a tiny generated mammography set, table columns, label subsets."""

import csv
import json

import pytest
import torch
import yaml

from benchmarks import run_all
from benchmarks.cells import label_subset
from benchmarks.tasks.lesions import lesion_detection
from medssl.data.holdout import write_pool_record
from medssl.hub import save_backbone
from medssl.models.vit import build_vit

TINY = {"model.hidden_dim": 64, "model.nheads": 2, "model.enc_layers": 1, "model.dec_layers": 1,
        "model.dim_feedforward": 32, "model.num_queries": 8, "model.two_stage": False, "mae.layers": 1}


@pytest.fixture(scope="module")
def mammo(tmp_path_factory):
    from data_tools import make_demo

    root = tmp_path_factory.mktemp("mammo")
    make_demo.main(["mammo", "--out", str(root), "--train", "6", "--val", "2", "--test", "3", "--target", "2",
                    "--height", "64", "--width", "64", "--abnormal-frac", "0.5", "--expert", "none"])
    return root


def test_label_subsets_are_stratified_by_lesion(mammo):
    task = lesion_detection(64, data_root=str(mammo), max_size=64, set=TINY)
    has = task.has_lesion()
    assert has.tolist().count(1) == 3 and len(has) == 6
    for seed in range(5):
        keep = label_subset(has, 2, seed, stratify=True)
        assert sorted(has[keep].tolist()) == [0, 1]  # one normal and one lesion image, whatever the seed
    sub = task.datasets()["train"].subset(keep)
    assert len(sub) == 2 and sum(len(sub.gt_boxes_xyxy(i)) > 0 for i in range(2)) == 1


def test_task_version_follows_what_decides_the_result(mammo):
    base = lesion_detection(64, data_root=str(mammo), max_size=64, set=TINY)
    assert base.config["data"]["target_split"] == "target"  # stages 2 and 3 adapt to the unlabelled vendor-B set
    same = lesion_detection(64, data_root=str(mammo), max_size=64, set=TINY)
    assert same.info["version"] == base.info["version"]
    for other in (lesion_detection(64, data_root=str(mammo), max_size=64, set={**TINY, "source_only.lr": 1e-3}),
                  lesion_detection(64, data_root=str(mammo), max_size=64, set=TINY,
                                   stages=["source_only", "cross_domain_mae"]),
                  lesion_detection(64, data_root=str(mammo), max_size=96, set=TINY)):
        assert other.info["version"] != base.info["version"]


def test_detection_rows_in_the_table(mammo, tmp_path):
    torch.manual_seed(0)
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "manifest.jsonl").write_text("")
    write_pool_record(tmp_path / "pool")  # pretrained on nothing: disjoint from the test images
    save_backbone(build_vit(32, 2, 2, 8, 64, 1), tmp_path / "bb", data=str(tmp_path / "pool"))
    det_hp = {"epochs": 1, "batch_size": 2, "lr": 1e-4, "lr_backbone": 1e-4, "cnn": "resnet10t"}
    cfg = {"name": "micro_det", "img_size": 32, "threads": 1, "device": "cpu",
           "backbones": [{"source": str(tmp_path / "bb"), "pretraining": "MAE", "data": "toy"}],
           "tasks": [{"name": "lesion_detection", "data_root": str(mammo), "max_size": 64, "set": TINY,
                      "protocols": ["finetune"], "label_fractions": [4], "seeds": [0]}],
           "protocols": ["probe", "finetune"], "label_fractions": [5, 1.0], "seeds": [0, 1], "detection": det_hp}
    (tmp_path / "det.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "results"
    assert run_all.main(["--config", str(tmp_path / "det.yaml"), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert ("| Pre-training | Data | Backbone | Protocol | Validation | R@0.3 | AP50 | Beats its baselines (paired "
            "95% CI, weakest) |") in md
    assert "Labels: 4 labelled" in md  # the task's own label fractions and seeds, not the table's
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["backbone"], r["protocol"], r["role"]) for r in rows} == {
        ("ResNet-10t", "scratch", "cnn"), ("ViT-32/8", "finetune", "pretrained"), ("ViT-32/8", "finetune", "random")}
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(cells) == 3
    for c in cells:
        assert c["n_train"] == 4 and c["stages"] == ["source_only"]
        assert set(c["metrics"]) >= {"r@0.3", "ap50", "num_images", "num_lesions"}
        assert c["metrics"]["num_images"] == 3  # scored on the held-out test split (val has 2 images)
        assert 0.0 <= c["metrics"]["r@0.3"] <= 1.0 and 0.0 <= c["metrics"]["ap50"] <= 1.0
    assert not (out / "work").exists() or not any((out / "work").iterdir())  # checkpoints cleaned up
    # the command line wins over the task's own seeds: seed 1 is missing (listed, not trained)
    assert run_all.main(["--config", str(tmp_path / "det.yaml"), "--out", str(out), "--seeds", "1",
                         "--report-only"]) == 0
    assert "PARTIAL TABLE: 3 cells not run yet" in (out / "results.md").read_text()
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks["lesion_detection"]["samples"] == {"train": 6, "val": 2, "test": 3}
