"""Classification metrics: confusion matrix, accuracy, sensitivity, specificity, rank-based AUC.

All functions take plain arrays (NumPy or anything `np.asarray` accepts, e.g. CPU tensors).
Conventions:
- `confusion_matrix[i, j]` counts samples of true class i predicted as class j (scikit-learn's order).
- A per-class ratio whose denominator is zero (a class absent from `y_true` for sensitivity, a class
  that is every sample for specificity) is NaN and left out of the macro mean (`np.nanmean`).
- AUC is the Mann-Whitney statistic with average ranks for ties (equal to the trapezoidal ROC area).
  For several classes it is one-vs-rest, unweighted macro mean over the classes that have both
  positives and negatives in `y_true` (scikit-learn raises instead; we skip and say so in the result).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np


def _labels(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) and not np.all(arr == np.round(arr))):
        raise ValueError(f"{name} must hold integer class indices")
    return arr.astype(np.int64)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """Confusion matrix with rows = true class, columns = predicted class.

    Args:
        y_true: [N] true class indices.
        y_pred: [N] predicted class indices.
        num_classes: number of classes; default max label + 1.

    Returns:
        [C, C] int64 counts.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 1, 0]).tolist()
        [[1, 0], [1, 1]]
    """
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in length")
    c = int(num_classes) if num_classes is not None else int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if t.size and (t.min() < 0 or p.min() < 0 or t.max() >= c or p.max() >= c):
        raise ValueError(f"class indices must lie in [0, {c}), got y_true/y_pred outside")
    return np.bincount(t * c + p, minlength=c * c).reshape(c, c).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of samples whose prediction equals the label."""
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} must be equal, non-empty")
    return float(np.mean(t == p))


def sensitivity_per_class(cm: np.ndarray) -> np.ndarray:
    """Recall of each class, TP / (TP + FN), from a confusion matrix; NaN for absent classes."""
    cm = np.asarray(cm, dtype=np.float64)
    return _safe_div(np.diag(cm), cm.sum(axis=1))


def specificity_per_class(cm: np.ndarray) -> np.ndarray:
    """TN / (TN + FP) of each class (one-vs-rest), from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    return _safe_div(tn, tn + fp)


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` with ties given the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    new_run = np.r_[True, xs[1:] != xs[:-1]]
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], xs.size]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty_like(x)
    ranks[order] = mean_rank[run_id]
    return ranks


def binary_auc(y_true: Any, score: Any) -> float:
    """Area under the ROC curve for binary labels (1 = positive), ties counted as 1/2.

    Returns NaN when `y_true` holds only one class.
    """
    t = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise ValueError(f"y_true {t.shape} and score {s.shape} differ in length")
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0  # Mann-Whitney U of the positives
    return float(u / (n_pos * n_neg))


def roc_auc(y_true: Any, scores: Any) -> tuple[float, np.ndarray]:
    """AUC: binary, or one-vs-rest per class and unweighted macro mean.

    Args:
        y_true: [N] class indices.
        scores: [N] positive-class scores (binary), or [N, C] per-class scores/probabilities.

    Returns:
        (macro AUC, [C] per-class AUC with NaN for classes lacking positives or negatives).
        For 1-D scores the per-class array has the single positive-class AUC.
    """
    t = _labels(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        auc = binary_auc(t == 1, s)
        return auc, np.array([auc])
    if s.ndim != 2 or s.shape[0] != t.shape[0]:
        raise ValueError(f"scores must be [N] or [N, C] with N={t.shape[0]}, got {s.shape}")
    if s.shape[1] == 2:
        auc = binary_auc(t == 1, s[:, 1])
        return auc, np.array([auc, auc])
    per = np.array([binary_auc(t == c, s[:, c]) for c in range(s.shape[1])])
    if np.any(np.isnan(per)) and np.any(~np.isnan(per)):
        warnings.warn(f"AUC: classes {np.flatnonzero(np.isnan(per)).tolist()} lack positives or "
                      "negatives and are left out of the macro mean", stacklevel=2)
    return _nanmean(per), per


def classification_report(y_true: Any, scores: Any, num_classes: int | None = None) -> dict[str, Any]:
    """All classification metrics from labels and [N, C] scores (logits or probabilities).

    The predicted class is the argmax of the scores. AUC ranks the scores as given; softmax
    probabilities and logits give the same binary AUC but may differ one-vs-rest, so pass
    probabilities for comparability with other tools.

    Returns:
        dict with accuracy, sensitivity (macro), specificity (macro), auc (macro), the per-class
        arrays as lists (sensitivity_per_class, specificity_per_class, auc_per_class) and the
        confusion matrix as nested lists.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {s.shape}")
    c = num_classes or s.shape[1]
    pred = s.argmax(axis=1)
    cm = confusion_matrix(y_true, pred, c)
    sens, spec = sensitivity_per_class(cm), specificity_per_class(cm)
    auc, auc_per = roc_auc(y_true, s)
    return {
        "accuracy": accuracy(y_true, pred),
        "sensitivity": _nanmean(sens),
        "specificity": _nanmean(spec),
        "auc": auc,
        "sensitivity_per_class": sens.tolist(),
        "specificity_per_class": spec.tolist(),
        "auc_per_class": auc_per.tolist(),
        "confusion_matrix": cm.tolist(),
    }
