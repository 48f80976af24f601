"""viz: overlays and FROC plots are written as PNGs of the expected size and content."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medssl.metrics.detection import froc
from medssl.viz import save_detections, save_froc


def test_save_detections(tmp_path):
    img = np.zeros((1, 120, 80), np.float32)
    p = save_detections(tmp_path / "sub" / "o.png", img, gt_boxes=np.array([[10, 10, 40, 40.]]),
                        pred_boxes=np.array([[12, 12, 42, 42.], [50, 60, 70, 90]]), pred_scores=[0.9, 0.1],
                        score_threshold=0.5)
    a = np.asarray(Image.open(p).convert("RGB")).astype(int)
    assert a.shape == (120, 80, 3)
    green = (a[..., 1] > 150) & (a[..., 0] < 100)  # ground truth outline
    orange = (a[..., 0] > 200) & (a[..., 1] > 100) & (a[..., 2] < 80)  # the kept prediction
    assert green[5:45, 5:45].any() and orange[8:48, 8:48].any()
    assert not orange[55:95, 45:75].any()  # below the score threshold: not drawn
    with pytest.raises(ValueError, match="2 pred_boxes but 1 pred_scores"):
        save_detections(tmp_path / "x.png", img, pred_boxes=np.zeros((2, 4)), pred_scores=[0.1])


def test_save_detections_max_side_scales_image_and_boxes(tmp_path):
    """A large image is drawn at `max_side` on its longer side, box-averaged, with its boxes scaled alike."""
    img = np.zeros((1200, 800), np.float32)
    img[600:1200, 400:800] = 1.0  # the bottom-right quarter is bright
    p = save_detections(tmp_path / "o.png", img, gt_boxes=np.array([[200, 100, 500, 400.]]), max_side=120)
    a = np.asarray(Image.open(p).convert("RGB")).astype(int)
    assert a.shape == (120, 80, 3)  # 1200 x 800 at 1/10
    green = (a[..., 1] > 150) & (a[..., 0] < 100)
    assert green[9:12, 20:50].any() and green[39:42, 20:50].any()  # top and bottom edges at y = 10 and 40
    assert not green[50:].any() and not green[:, 55:].any()
    assert (a[70:115, 45:75] > 200).all() and (a[5:55, 5:15] < 50).all()  # the bright quarter, the dark rest
    # unequal ratios after rounding (700 x 1000 -> 90 x 128: x by 90/700, y by 128/1000); a prediction scaled alike
    wide = np.zeros((1000, 700), np.float32)
    p = save_detections(tmp_path / "w.png", wide, pred_boxes=np.array([[350, 500, 700, 1000.]]), pred_scores=[0.9],
                        max_side=128)
    a = np.asarray(Image.open(p).convert("RGB")).astype(int)
    orange = (a[..., 0] > 200) & (a[..., 1] > 100) & (a[..., 2] < 80)
    assert a.shape == (128, 90, 3) and orange[60:68, 44:48].any() and not orange[:60, :40].any()  # from (45, 64)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="max_side must be >= 1"):
            save_detections(tmp_path / "x.png", wide, max_side=bad)


def test_save_froc(tmp_path):
    r = froc([np.array([[0, 0, 10, 10.]])], [np.array([0.8])], [np.array([[0, 0, 10, 10.]])])
    p = save_froc(tmp_path / "f.png", {"a": r, "b": r}, dpi=50)
    assert Image.open(p).size == (250, 200)
    assert save_froc(tmp_path / "g.png", r).is_file()
