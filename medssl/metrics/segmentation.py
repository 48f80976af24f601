"""Segmentation metrics: Dice and IoU per class and mean, accumulated over a whole data set.

Convention: pixels are pooled over all images of the set (one confusion matrix for the set), so
Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c) and IoU_c = TP_c / (TP_c + FP_c + FN_c) over every pixel.
A class absent from both prediction and target (denominator 0) has NaN Dice/IoU and is left out of
the mean. `mean_dice` / `mean_iou` average the foreground classes (all classes except
`background`, default class 0, as tissue-segmentation papers do); pass `background=None` to
average every class. Pixels whose target equals `ignore_index` are not counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def segmentation_confusion(pred: Any, target: Any, num_classes: int,
                           ignore_index: int | None = None) -> np.ndarray:
    """Pixel confusion matrix (rows = true class, columns = predicted class).

    Args:
        pred: [N, H, W] (or any shape) predicted class indices.
        target: same shape, true class indices.
        num_classes: number of classes C.
        ignore_index: target value to skip.

    Returns:
        [C, C] int64 counts.
    """
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(target).reshape(-1).long()
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same number of pixels: {p.numel()} vs {t.numel()}")
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        lo, hi = int(t.min()), int(t.max())
        raise ValueError(f"target classes must lie in [0, {num_classes}), got [{lo}, {hi}]")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"pred classes must lie in [0, {num_classes})")
    cm = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def _ratios(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    union = tp + fp + fn
    dice = np.full(tp.shape, np.nan)
    iou = np.full(tp.shape, np.nan)
    ok = union > 0
    dice[ok] = 2 * tp[ok] / (2 * tp[ok] + fp[ok] + fn[ok])
    iou[ok] = tp[ok] / union[ok]
    return dice, iou


def dice_per_class(cm: np.ndarray) -> np.ndarray:
    """[C] Dice from a pixel confusion matrix; NaN for classes absent from prediction and target."""
    return _ratios(cm)[0]


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """[C] IoU (Jaccard) from a pixel confusion matrix; NaN for classes absent from both."""
    return _ratios(cm)[1]


def _mean(x: np.ndarray, background: int | None) -> float:
    keep = np.ones(x.shape, dtype=bool)
    if background is not None and 0 <= background < x.size:
        keep[background] = False
    vals = x[keep & ~np.isnan(x)]
    return float(vals.mean()) if vals.size else float("nan")


def segmentation_report(cm: np.ndarray, background: int | None = 0) -> dict[str, Any]:
    """Dice and IoU per class and their means from an accumulated confusion matrix.

    Returns:
        dict with dice (mean over foreground classes), iou, dice_per_class, iou_per_class, pixel_accuracy.
    """
    dice, iou = _ratios(cm)
    total = float(np.asarray(cm).sum())
    return {
        "dice": _mean(dice, background),
        "iou": _mean(iou, background),
        "dice_per_class": dice.tolist(),
        "iou_per_class": iou.tolist(),
        "pixel_accuracy": float(np.trace(cm) / total) if total else float("nan"),
    }


class SegmentationMeter:
    """Accumulate a pixel confusion matrix batch by batch.

    Example:
        >>> m = SegmentationMeter(3)
        >>> m.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
        >>> m.report()["pixel_accuracy"]
        1.0
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, background: int | None = 0):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index, self.background = num_classes, ignore_index, background
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch of predicted and true class maps (same shape)."""
        self.cm += segmentation_confusion(pred, target, self.num_classes, self.ignore_index)

    def report(self) -> dict[str, Any]:
        """Metrics over everything seen so far."""
        return segmentation_report(self.cm, self.background)
