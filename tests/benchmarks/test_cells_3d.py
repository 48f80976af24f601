"""3-D table cells: a pretrained 3-D ViT (UNETR), its random-init twin and the 3-D U-Net train end to end on a
tiny volume task, their Dice is the hand count from their test predictions; rows of other dimensions are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from benchmarks import cells  # noqa: E402
from benchmarks.cells import Backbone, _build, run_cell, twin_source  # noqa: E402
from benchmarks.run_all import task_rows  # noqa: E402
from benchmarks.tasks import TaskData  # noqa: E402
from medssl.hub import backbone_record, save_backbone  # noqa: E402
from medssl.models.mae import create_mae  # noqa: E402
from medssl.models.vit import build_vit  # noqa: E402

torch.set_num_threads(1)
S = 16  # volume side: one 16^3 patch for the ViT
HP = {"epochs": 6, "batch_size": 2, "lr_grid": [1e-3, 3e-3], "evals": 2, "unetr_feature_size": 4, "unet_base": 4,
      "unet_levels": 2, "warmup_frac": 0.0}


def _balls(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:S, 0:S, 0:S]
    vols, masks = [], []
    for _ in range(n):
        c = g.uniform(5, S - 5, 3)
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 16
        vols.append(g.uniform(0, 0.3, ball.shape) + 0.6 * ball)
        masks.append(ball)
    return torch.tensor(np.stack(vols), dtype=torch.float32)[:, None], torch.tensor(np.stack(masks)).long()


def _task(dims: int = 3) -> TaskData:
    if dims == 2:
        x, y = _balls(4, 0)
        return TaskData("balls_2d", "segmentation", "synthetic", 2, ["background", "ball"],
                        {k: (x[:, :, 0], y[:, 0]) for k in ("train", "val", "test")})
    return TaskData("balls_3d", "segmentation", "synthetic", 2, ["background", "ball"],
                    {"train": _balls(4, 0), "val": _balls(2, 1), "test": _balls(2, 2)})


@pytest.fixture(scope="module")
def source3d(tmp_path_factory):
    torch.manual_seed(0)
    mae = create_mae("mae_vit_tiny_patch16", img_size=S, spatial_dims=3, cls_token=False, embed_dim=24,
                     decoder_depth=1, decoder_embed_dim=16, decoder_num_heads=2)
    return str(save_backbone(mae, tmp_path_factory.mktemp("bb3") / "bb"))


@pytest.fixture(scope="module")
def source2d(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_backbone(build_vit(24, 2, 3, 8, S, 1, mlp_ratio=2.0), tmp_path_factory.mktemp("bb2") / "bb"))


def _rows(source3d: str) -> list[Backbone]:
    return [Backbone("vit", source3d, "MAE", "-", "ViT-3d"),
            Backbone("vit_random", twin_source(backbone_record(source3d)), "none", "-", "ViT-3d"),
            Backbone("cnn", "unet", "none", "-", "U-Net")]


def _record_predictions(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (logits, targets) that `cells.predict` returns from now on, in call order."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = cells.predict

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(cells, "predict", spy)
    return seen


def test_3d_rows_train_and_dice_is_the_hand_count(source3d, monkeypatch):
    task = _task()
    seen = _record_predictions(monkeypatch)
    cells._LOADED.clear()
    dice = {}
    for bb in _rows(source3d):
        res = run_cell(task, bb, "scratch" if bb.kind == "cnn" else "finetune", 1.0, 0, HP, S, device="cpu")
        logits, tgt = seen[-1]
        assert logits.shape == (2, 2, S, S, S) and torch.equal(tgt, task.splits["test"][1])
        pred, truth = logits.argmax(1).numpy() == 1, tgt.numpy() == 1
        hand = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
        assert res["metrics"]["dice"] == pytest.approx(hand, abs=1e-12)  # foreground Dice over the test set
        assert set(res["val_by_lr"]) == {"0.001", "0.003"} and res["val_score"] == max(res["val_by_lr"].values())
        dice[bb.kind] = hand
    assert dice["cnn"] > 0.5, dice  # the U-Net learns the balls in a few steps


def test_unetr_rows_keep_layer_decay_for_pretrained_weights_only(source3d):
    task = _task()
    pre, twin, _ = _rows(source3d)
    for bb, decay in ((pre, 0.5), (twin, 1.0)):
        torch.manual_seed(0)
        model, groups = _build(task, bb, "finetune", {**HP, "lr": 1.0, "layer_decay": 0.5}, S)
        assert type(model).__name__ == "UNETR"
        scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
        decay_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
        assert scale["vit.patch_embedding.position_embeddings"] == decay ** 13  # 12 blocks: embeddings layer 0
        assert scale["vit.blocks.11.mlp.linear1.weight"] == decay and scale["out.conv.conv.weight"] == 1.0
        assert decay_of["vit.patch_embedding.position_embeddings"] == 0.0  # a token: no weight decay
    with pytest.raises(ValueError, match="fine-tune UNETR"):
        _build(task, pre, "probe", HP, S)


def test_rows_of_other_dimensions_are_refused(source3d, source2d, capsys):
    vol, img = _task(3), _task(2)
    bb2 = Backbone("vit", source2d, "MAE", "-", "ViT-2d")
    pre3, twin3, cnn = _rows(source3d)
    with pytest.raises(ValueError, match=r"takes images \(2-D\), task balls_3d holds volumes \(3-D\)"):
        _build(vol, bb2, "finetune", HP, S)
    for bb in (pre3, twin3):
        with pytest.raises(ValueError, match=r"takes volumes \(3-D\), task balls_2d holds images \(2-D\)"):
            run_cell(img, bb, "finetune", 1.0, 0, HP, S, device="cpu")
    assert task_rows(vol, [bb2, pre3, twin3]) == [pre3, twin3]
    assert "ViT-2d (MAE)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no backbone of the config does"):
        task_rows(img, [pre3, twin3, cnn])


def _ball_or_not(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy volumes, every other one with a bright ball: class 1 = ball."""
    x, _ = _balls(n, seed)
    y = torch.arange(n) % 2
    x = torch.where(y[:, None, None, None, None].bool(), x, torch.rand_like(x) * 0.3)
    return x, y


def test_3d_classification_rows_train_and_auc_is_the_hand_count(source3d, monkeypatch):
    """The 3-D ViT fine-tuned with `VolumeClassifier`, its random-init twin and the 3-D ResNet train on a tiny
    volume task; AUC and accuracy recomputed by hand from the test logits the cell scored."""
    task = TaskData("ball_3d", "classification", "synthetic", 2, ["none", "ball"],
                    {"train": _ball_or_not(8, 0), "val": _ball_or_not(4, 1), "test": _ball_or_not(6, 2)})
    seen = _record_predictions(monkeypatch)
    cells._LOADED.clear()
    rows = _rows(source3d)[:2] + [Backbone("cnn", "resnet3d", "none", "-", "ResNet-3D")]
    kinds = []
    for bb in rows:
        res = run_cell(task, bb, "scratch" if bb.kind == "cnn" else "finetune", 1.0, 0, {**HP, "batch_size": 4}, S,
                       device="cpu")
        logits, tgt = seen[-1]
        assert logits.shape == (6, 2) and torch.equal(tgt, task.splits["test"][1])
        p = logits.softmax(1)[:, 1].numpy()
        pos, neg = p[tgt.numpy() == 1], p[tgt.numpy() == 0]
        auc = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
        assert res["metrics"]["auc"] == pytest.approx(auc, abs=1e-12)
        assert res["metrics"]["accuracy"] == pytest.approx(float((logits.argmax(1) == tgt).float().mean()))
        assert set(res["val_by_lr"]) == {"0.001", "0.003"} and res["val_score"] == max(res["val_by_lr"].values())
        kinds.append(type(_build(task, bb, "scratch" if bb.kind == "cnn" else "finetune", {**HP, "lr": 1e-3},
                                 S)[0]).__name__)
    assert kinds == ["VolumeClassifier", "VolumeClassifier", "ResNet"]


def test_3d_knn_rows_choose_k_on_validation_and_auc_is_the_hand_count(source3d, monkeypatch):
    """kNN on the frozen 3-D ViT's features (pretrained and twin): k chosen on validation; the test AUC recomputed
    by hand from the probabilities `knn_probs` gave."""
    from medssl.heads import knn

    task = TaskData("ball_3d", "classification", "synthetic", 2, ["none", "ball"],
                    {"train": _ball_or_not(8, 0), "val": _ball_or_not(4, 1), "test": _ball_or_not(6, 2)})
    seen = []
    real = knn.knn_probs

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(knn, "knn_probs", spy)
    cells._LOADED.clear()
    cells.FEATURES._entries.clear()
    for bb in _rows(source3d)[:2]:
        res = run_cell(task, bb, "knn", 1.0, 0, {"blocks": 2, "k_grid": [1, 3]}, S, device="cpu")
        assert set(res["val_by_k"]) == {"1", "3"} and res["val_score"] == res["val_by_k"][str(res["k"])]
        assert res["val_score"] == max(res["val_by_k"].values())
        p, y = seen[-1][:, 1].numpy(), task.splits["test"][1].numpy()  # the test call comes last
        auc = np.mean([(a > b) + 0.5 * (a == b) for a in p[y == 1] for b in p[y == 0]])
        assert res["metrics"]["auc"] == pytest.approx(auc, abs=1e-12)


def test_run_all_plans_the_3d_classification_rows(tmp_path, monkeypatch):
    """A 3-D classification task gets the fine-tuned 3-D ViT, its random-init twin and the 3-D ResNet, each with the
    lr grid searched on validation, and the kNN rows of both ViTs."""
    import csv

    import yaml

    from benchmarks import run_all
    from medssl.data.holdout import write_pool_record

    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "manifest.jsonl").write_text("")
    write_pool_record(tmp_path / "pool")  # pretrained on nothing: disjoint from every test set
    torch.manual_seed(0)
    mae = create_mae("mae_vit_tiny_patch16", img_size=S, spatial_dims=3, cls_token=False, embed_dim=24,
                     decoder_depth=1, decoder_embed_dim=16, decoder_num_heads=2)
    save_backbone(mae, tmp_path / "bb3", data=str(tmp_path / "pool"))
    (tmp_path / "test.bin").write_bytes(b"test volume")
    task = TaskData("ball_3d", "classification", "synthetic", 2, ["none", "ball"],
                    {"train": _ball_or_not(8, 0), "val": _ball_or_not(4, 1), "test": _ball_or_not(6, 2)},
                    test_files=[str(tmp_path / "test.bin")])
    monkeypatch.setattr(run_all, "build_task", lambda spec, img: task)
    hp = {**HP, "batch_size": 4}
    cfg = {"name": "vol", "img_size": S, "threads": 1, "device": "cpu", "tasks": [{"name": "ball_3d"}],
           "backbones": [{"source": str(tmp_path / "bb3"), "pretraining": "MAE", "data": "toy"}],
           "protocols": ["finetune", "knn"], "label_fractions": [1.0], "seeds": [0], "finetune": hp, "scratch": hp,
           "knn": {"blocks": 2, "k_grid": [1, 3]}}
    (tmp_path / "vol.yaml").write_text(yaml.safe_dump(cfg))
    assert run_all.main(["--config", str(tmp_path / "vol.yaml"), "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert sorted((r["pretraining"], r["backbone"], r["protocol"]) for r in rows) == [
        ("MAE", "ViT-24/16", "finetune"), ("MAE", "ViT-24/16", "knn"), ("none (from scratch)", "ResNet-3D", "scratch"),
        ("none (random init)", "ViT-24/16", "finetune"), ("none (random init)", "ViT-24/16", "knn")]
    assert all(0.0 <= float(r["auc"]) <= 1.0 for r in rows)
