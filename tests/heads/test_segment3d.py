"""3-D segmentation: UNETR on a medssl 3-D backbone trained on tiny volumes by the Engine; Dice by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

monai = pytest.importorskip("monai")

from medssl.heads.fit import FitConfig, dice_score, predict, train_supervised  # noqa: E402
from medssl.heads.segment import dice_ce_loss  # noqa: E402
from medssl.heads.segment3d import build_unetr  # noqa: E402
from medssl.hub import save_backbone  # noqa: E402
from medssl.models.mae import create_mae  # noqa: E402


def spheres(n: int, seed: int, size: int = 32) -> TensorDataset:
    """Noisy volumes with one bright ball each; the label is the ball."""
    g = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:size, 0:size, 0:size]
    vols, masks = [], []
    for _ in range(n):
        c, r = g.uniform(10, size - 10, 3), g.uniform(5, 8)
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        vols.append(g.normal(0, 0.3, ball.shape) + ball * 1.5)
        masks.append(ball)
    return TensorDataset(torch.tensor(np.stack(vols), dtype=torch.float32)[:, None],  # [N, 1, D, H, W]
                         torch.tensor(np.stack(masks), dtype=torch.long))  # [N, D, H, W]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.manual_seed(0)
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, spatial_dims=3, cls_token=False, decoder_depth=1,
                     decoder_embed_dim=48, decoder_num_heads=4)
    return save_backbone(mae, tmp_path_factory.mktemp("bb") / "backbone")


def test_unetr_cell_trains_on_tiny_volumes_and_dice_matches_hand(backbone):
    torch.manual_seed(0)
    model = build_unetr(backbone, num_classes=2, feature_size=8)
    train, val = spheres(6, 0), spheres(3, 1)
    cfg = FitConfig(epochs=10, batch_size=2, lr=1e-2, warmup_epochs=1, device="cpu")
    res = train_supervised(model, train, val, dice_ce_loss, dice_score(2), cfg)
    logits, _ = predict(model, val, batch_size=2, device="cpu")  # [3, 2, 32, 32, 32]
    pred, truth = logits.argmax(1).numpy().astype(bool), val.tensors[1].numpy().astype(bool)
    hand = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())  # foreground Dice over the whole set, by hand
    assert dice_score(2)(logits, val.tensors[1]) == pytest.approx(hand, abs=1e-12)
    assert res.best_score == pytest.approx(hand, abs=1e-12)  # the best epoch's weights are the ones kept
    assert hand > 0.7, f"UNETR did not learn the balls (Dice {hand:.3f})"


def test_build_unetr_checks_the_backbone(tmp_path):
    small = create_mae("mae_vit_tiny_patch8", img_size=32, spatial_dims=3, cls_token=False, depth=2)
    with pytest.raises(ValueError, match="12-block ViT with 16\\^3 patches"):
        build_unetr(save_backbone(small, tmp_path / "small"), 2)
    with pytest.raises(ValueError, match="logits must be"):
        dice_ce_loss(torch.zeros(1, 2, 4), torch.zeros(1, 4))
