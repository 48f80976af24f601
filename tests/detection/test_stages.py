"""End to end on a tiny synthetic set: the three MedMask stages, checkpoints, metrics, predict, recipe errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.config import load_config
from medssl.data.coco import DatasetNotFoundError
from medssl.detection import stages
from medssl.detection.config import DEFAULTS, STAGES
from medssl.detection.data import build_splits
from medssl.detection.evaluation import operating_threshold
from medssl.detection.predict import predict_files
from tests.detection.conftest import TINY


def _cfg(root: Path, out: Path, *extra: str) -> dict:
    sets = [f"data.data_root={root}", f"data.embeddings={root / 'demo' / 'embeddings'}", f"out={out}", *TINY, *extra]
    return load_config(DEFAULTS, Path("recipes/configs/medmask_demo.yaml"), sets)


def test_three_stages_end_to_end(tiny_root, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(tiny_root, tmp_path / "run", "eval.pseudo_truth=target_truth")
    results = stages.run_stages(cfg, STAGES)
    assert set(results) == {"random_boxes", "test", "final", *STAGES}
    assert set(results["test"]) == {"random_boxes", *STAGES}  # held-out split, each stage's best
    assert results["test"]["teaching"]["num_images"] == 1
    for stage in STAGES:
        assert 0.0 <= results[stage]["R@0.3"] <= 1.0 and "AP50" in results[stage]
        sdir = tmp_path / "run" / stage
        assert (sdir / "froc.png").is_file() and list((sdir / "overlays").glob("*.png"))
        ck = torch.load(sdir / "best.pt", weights_only=True)  # safe to load
        assert ck["stage"] == stage and "R@0.3" in ck["metrics"]
    metrics = json.loads((tmp_path / "run" / "teaching" / "metrics.json").read_text())
    assert "loss_pseudo" in metrics["history"][0] and "loss_mae" in metrics["history"][0]
    assert "loss_mae" not in metrics["history"][1]  # MAE only for the first mae_epochs of teaching
    assert "loss_distill" in metrics["history"][0]
    # the pseudo-label diagnostic per teaching epoch, against the target pool's true boxes
    truth = json.loads((tiny_root / "demo" / "annotations" / "instances_target_truth.json").read_text())
    for h in metrics["history"]:
        assert h["true_per_image"] == round(len(truth["annotations"]) / len(truth["images"]), 4)
        assert {"pseudo_precision", "pseudo_recall", "pseudo_per_image"} <= set(h)
    assert (tmp_path / "run" / "froc_all.png").is_file()
    # the run hands over its best stage on validation (ties: the earlier), never a worse later one
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = max(STAGES, key=lambda s: (summary[s]["R@0.3"], -STAGES.index(s)))
    assert summary["final"] == results["final"] == {"stage": best, "select": "R@0.3", "val": summary[best]["R@0.3"],
                                                    "checkpoint": str(tmp_path / "run" / "final.pt")}
    assert (tmp_path / "run" / "final.pt").read_bytes() == (tmp_path / "run" / best / "best.pt").read_bytes()
    summary["teaching"]["R@0.3"] = 2.0  # a better teaching stage is handed over instead
    assert stages.hand_over(tmp_path / "run", summary, "R@0.3")["stage"] == "teaching"
    assert (tmp_path / "run" / "final.pt").read_bytes() == (tmp_path / "run" / "teaching" / "best.pt").read_bytes()
    # predict on a folder: JSON + overlays
    preds = predict_files(tmp_path / "run" / "teaching" / "best.pt", [tiny_root / "demo" / "images" / "test"],
                                 tmp_path / "pred")
    assert len(preds) == 1 and (tmp_path / "pred" / "predictions.json").is_file()
    assert len(list((tmp_path / "pred").glob("*_pred.png"))) == 1
    assert all(len(b) == 4 for b in preds[0]["boxes"])


def test_missing_embedding_is_an_error_or_counted(tiny_root, tmp_path):
    emb = tmp_path / "emb"
    emb.mkdir()
    for f in (tiny_root / "demo" / "embeddings").glob("*.npy"):
        if f.name != "train_00000_embedding.npy":  # one training image lacks its embedding
            (emb / f.name).write_bytes(f.read_bytes())
    cfg = _cfg(tiny_root, tmp_path / "run", f"data.embeddings={emb}")
    with pytest.raises(FileNotFoundError, match="train_00000_embedding.npy"):
        stages.train_stage("cross_domain_mae", cfg, tmp_path / "run")
    cfg = _cfg(tiny_root, tmp_path / "run", f"data.embeddings={emb}", "data.skip_missing_embeddings=true")
    res = stages.train_stage("cross_domain_mae", cfg, tmp_path / "run")
    assert res["history"][0]["missing_embeddings"] == 1  # that image trained without the term, counted
    assert "loss_distill" in res["history"][0]


def test_missing_dataset_message(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("medmask_detect", "recipes/medmask_detect.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert recipe.main(["--dataset", "ddsm", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "instances_train.json" in err and "--dataset demo" in err
    with pytest.raises(DatasetNotFoundError):
        build_splits(load_config(DEFAULTS, None, [f"data.data_root={tmp_path}"]))
    assert recipe.main(["--dataset", "ddsm", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--stage", "teaching"]) == 2
    assert "run --stage cross_domain_mae first" in capsys.readouterr().err


def test_operating_threshold():
    curve = {"curve": {"thresholds": np.array([np.inf, 0.9, 0.5, 0.2]), "fps_per_image": np.array([0, 0.1, 0.3, 1.0]),
                       "sensitivity": np.array([0, 0.5, 0.7, 0.9])}}
    assert operating_threshold(curve, 0.3) == 0.5
    assert operating_threshold(curve, 0.05) == 1.0  # nothing qualifies: show nothing
