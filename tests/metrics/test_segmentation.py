"""Dice / IoU against hand computations and scikit-learn's per-pixel scores."""

import numpy as np
import pytest
import torch

from medssl.metrics.segmentation import (
    SegmentationMeter,
    dice_per_class,
    iou_per_class,
    segmentation_confusion,
    segmentation_report,
)


def test_hand_case():
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 0]])
    cm = segmentation_confusion(pred, target, 3)
    # class 1: TP=2, FP=1 (pos (0,1)), FN=1 (pos (1,3)) -> dice 4/6, iou 2/4
    # class 2: TP=1, FP=0, FN=1 -> dice 2/3, iou 1/2
    np.testing.assert_allclose(dice_per_class(cm)[1:], [4 / 6, 2 / 3])
    np.testing.assert_allclose(iou_per_class(cm)[1:], [0.5, 0.5])
    r = segmentation_report(cm)
    assert r["dice"] == pytest.approx((4 / 6 + 2 / 3) / 2)
    assert r["pixel_accuracy"] == pytest.approx(5 / 8)


def test_empty_class_excluded_and_ignore_index():
    target = torch.tensor([0, 0, 1, 255])
    pred = torch.tensor([0, 0, 1, 2])
    cm = segmentation_confusion(pred, target, 3, ignore_index=255)
    d = dice_per_class(cm)
    assert np.isnan(d[2]) and d[1] == 1.0
    assert segmentation_report(cm)["dice"] == 1.0
    assert segmentation_report(cm, background=None)["iou"] == 1.0


def test_meter_accumulates_like_pooled_pixels():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    t = rng.integers(0, 3, (4, 8, 8))
    p = rng.integers(0, 3, (4, 8, 8))
    m = SegmentationMeter(3)
    for i in range(4):
        m.update(torch.from_numpy(p[i]), torch.from_numpy(t[i]))
    r = m.report()
    f1 = skm.f1_score(t.ravel(), p.ravel(), average=None, labels=[0, 1, 2])
    jac = skm.jaccard_score(t.ravel(), p.ravel(), average=None, labels=[0, 1, 2])
    np.testing.assert_allclose(r["dice_per_class"], f1)
    np.testing.assert_allclose(r["iou_per_class"], jac)
    assert r["dice"] == pytest.approx(f1[1:].mean())


def test_bad_input():
    with pytest.raises(ValueError, match="target classes"):
        segmentation_confusion(torch.tensor([0]), torch.tensor([5]), 3)
    with pytest.raises(ValueError, match="same number"):
        segmentation_confusion(torch.zeros(3), torch.zeros(4), 3)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMeter(0)
