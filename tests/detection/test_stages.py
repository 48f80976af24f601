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


def _bn_means(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_target_forward_adapts_bn_statistics_and_freeze_bn_keeps_them():
    """AdaBN control: the target batch goes through the detector in train mode with no loss, so BatchNorm running
    statistics move by exactly what a train-mode forward of that batch gives; freeze_bn keeps them."""
    import copy

    from medssl.detection.detr import build_detector, demo_detector_config

    torch.manual_seed(0)
    det = build_detector(demo_detector_config(backbone_name="resnet10t", hidden_dim=32, nheads=2, enc_layers=1,
                                              dec_layers=1, dim_feedforward=64, num_queries=6))
    x, tx = torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64) * 3 + 1
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.zeros(1, dtype=torch.int64), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    batch = ((x, mask, targets, [None, None]), ((tx, tx), mask, targets, [None, None]))
    sc = {**DEFAULTS["cross_domain_mae"], "mae_weight": 0.0, "distill_weight": 0.0}
    runs = {}
    for name, extra in {"plain": {}, "adabn": {"target_forward": True},
                        "frozen": {"target_forward": True, "freeze_bn": True}}.items():
        model = stages.StageModel("cross_domain_mae", {**sc, **extra}, copy.deepcopy(det), None, None, None,
                                  paired=True).train()
        runs[name] = (model(batch), _bn_means(model.detector))
    expected = copy.deepcopy(det).train()
    expected(x, mask)
    with torch.no_grad():
        expected(tx, mask)  # the source batch then the target batch, both in train mode
    for a, b in zip(runs["adabn"][1], _bn_means(expected)):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(runs["adabn"][1], runs["plain"][1]))
    for a, b in zip(runs["frozen"][1], _bn_means(det)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # statistics frozen
    # the target forward adds no loss term: the losses equal the plain run's
    assert set(runs["adabn"][0]) == set(runs["plain"][0]) == {"loss", "det"}
    assert runs["adabn"][0]["loss"].item() == pytest.approx(runs["plain"][0]["loss"].item(), rel=1e-6)


def test_pseudo_weight_scales_only_the_pseudo_label_loss():
    """teaching.pseudo_weight multiplies the pseudo-label loss and nothing else (0: the control without
    pseudo-labels; the teacher, the strong-view forward and every other term alike)."""
    import copy

    from medssl.detection.detr import build_detector, demo_detector_config

    torch.manual_seed(0)
    det = build_detector(demo_detector_config(backbone_name="resnet10t", hidden_dim=32, nheads=2, enc_layers=1,
                                              dec_layers=1, dim_feedforward=64, num_queries=6))
    x, tx = torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.zeros(1, dtype=torch.int64), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    batch = ((x, mask, targets, [None, None]), ((tx, tx), mask, targets, [None, None]))
    sc = {**DEFAULTS["teaching"], "mae_weight": 0.0, "distill_weight": 0.0, "score_threshold": 0.0}
    out = {}
    for w in (1.0, 0.5, 0.0):
        model = stages.StageModel("teaching", {**sc, "pseudo_weight": w}, copy.deepcopy(det), None, None,
                                  copy.deepcopy(det), paired=True).train()
        out[w] = {k: v.item() for k, v in model(batch).items()}
    assert out[1.0]["n_pseudo"] > 0 and out[1.0]["pseudo"] > 0
    assert out[0.5]["pseudo"] == pytest.approx(0.5 * out[1.0]["pseudo"], rel=1e-6) and out[0.0]["pseudo"] == 0
    for w in (0.5, 0.0):
        assert out[w]["det"] == out[1.0]["det"] and out[w]["n_pseudo"] == out[1.0]["n_pseudo"]
        assert out[w]["loss"] == pytest.approx(out[w]["det"] + out[w]["pseudo"], rel=1e-6)


def test_handed_stage_by_hand():
    """The stage final.pt holds: best on validation (NaN or missing lowest, ties to the earlier), or the last."""
    s = {"source_only": {"R@0.3": 0.5}, "cross_domain_mae": {"R@0.3": 0.7}, "teaching": {"R@0.3": 0.7}}
    ran = list(s)
    assert stages.handed_stage(s, ran, "R@0.3") == "cross_domain_mae"  # tie: the earlier
    assert stages.handed_stage(s, ran, "R@0.3", "last") == "teaching"
    s["cross_domain_mae"]["R@0.3"] = float("nan")
    assert stages.handed_stage(s, ran, "R@0.3") == "teaching"
    assert stages.handed_stage({"source_only": {}, "teaching": {"R@0.3": 0.0}}, ["source_only", "teaching"],
                               "R@0.3") == "teaching"


def test_teaching_threshold_per_epoch():
    """The task's threshold logic: fixed stays, MedMask's schedule follows the epoch, MRT updates once per finished
    epoch from that epoch's matched source scores (not again on a repeated call) and keeps t without a match."""
    from types import SimpleNamespace

    from medssl.train.dist import DistInfo

    engine = SimpleNamespace(dist=DistInfo())

    def task(rule: str) -> SimpleNamespace:
        model = SimpleNamespace(threshold=0.3, matched=[0.0, 0])
        return SimpleNamespace(sc={**DEFAULTS["teaching"], "threshold": rule, "epochs": 4, "threshold_max": 0.5},
                               model=model, threshold_epoch=0)

    t = task("fixed")
    assert stages.StageTask._threshold(t, engine, 3) == 0.3
    t = task("medmask")
    assert stages.StageTask._threshold(t, engine, 2) == pytest.approx(0.1 + 0.7 * (2 / (1 + np.exp(-0.5)) - 1))
    t = task("mrt")
    assert stages.StageTask._threshold(t, engine, 0) == 0.3  # epoch 0 starts at score_threshold
    t.model.matched = [1.28, 2]  # epoch 0 matched two source predictions, mean score 0.64
    t.model.threshold = stages.StageTask._threshold(t, engine, 1)
    assert t.model.threshold == pytest.approx(0.9 * 0.3 + 0.05 * 0.8) and t.model.matched == [0.0, 0]
    assert stages.StageTask._threshold(t, engine, 1) == pytest.approx(0.31)  # epoch 1 again (a resume): no update
    assert stages.StageTask._threshold(t, engine, 2) == pytest.approx(0.31)  # nothing matched in epoch 1: kept


def test_stage_options_end_to_end(tiny_root, tmp_path):
    """Controls and teaching options through the stage machinery: a stage 2 without MAE reads no target batch
    (unless target_forward), eval.checkpoint=last hands over last.pt, teaching with MRT's threshold and
    keep_better saves as best.pt the model whose validation score it reports, an oracle trains on two splits."""
    from medssl.detection.evaluation import evaluate
    from medssl.detection.predict import load_detector

    cfg = _cfg(tiny_root, tmp_path / "run", "cross_domain_mae.mae_weight=0", "cross_domain_mae.distill_weight=0",
               "eval.checkpoint=last", "teaching.threshold=mrt", "teaching.keep_better=true",
               "teaching.distill_weight=0", "teaching.mae_weight=0", "train.precision=fp32")  # scored as below
    task = stages.StageTask("cross_domain_mae", cfg, build_splits(cfg), tmp_path, load_init=False)
    assert not task.paired
    cfg2 = _cfg(tiny_root, tmp_path / "run", "cross_domain_mae.mae_weight=0", "cross_domain_mae.target_forward=true")
    assert stages.StageTask("cross_domain_mae", cfg2, build_splits(cfg2), tmp_path, load_init=False).paired
    res = stages.train_stage("cross_domain_mae", cfg, tmp_path / "run")
    assert res["checkpoint"] == str(tmp_path / "run" / "cross_domain_mae" / "last.pt")
    res = stages.train_stage("teaching", cfg, tmp_path / "run", init=res["checkpoint"])
    hist = res["history"]
    assert hist[0]["pseudo_threshold"] == 0.0 and hist[1]["pseudo_threshold"] >= 0.25  # MRT's floor
    assert all("kept_student" in h["val"] for h in hist)
    model, _ = load_detector(tmp_path / "run" / "teaching" / "best.pt", torch.device("cpu"))
    again = evaluate(model, build_splits(cfg)["val"], cfg, torch.device("cpu"))[0]
    assert again["R@0.3"] == pytest.approx(res["best"]["R@0.3"])
    oracle = build_splits(_cfg(tiny_root, tmp_path, 'data.train_split=["train", "target_truth"]'))["train"]
    truth = json.loads((tiny_root / "demo" / "annotations" / "instances_target_truth.json").read_text())
    assert len(oracle) == 4 + 3 and oracle.file_of(5) == tiny_root / "demo" / "images" / "target" / "target_00001.png"
    n_truth = sum(a["image_id"] == truth["images"][1]["id"] for a in truth["annotations"])
    assert len(oracle.gt_boxes_xyxy(5)) == n_truth and len(oracle[5][1]["labels"]) == n_truth
