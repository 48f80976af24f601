"""Drawing helpers: detections vs ground truth on an image, and FROC curves, written as PNG files.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change, no display).

Example::

    save_detections("overlay.png", image, gt_boxes=gt, pred_boxes=boxes, pred_scores=scores)
    save_froc("froc.png", {"medmask": froc(...), "random boxes": froc(...)})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _figure(w_in: float, h_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_in, h_in))
    FigureCanvasAgg(fig)
    return fig


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def save_detections(path: str | Path, image: Any, *, gt_boxes: Any = None, pred_boxes: Any = None,
                    pred_scores: Any = None, score_threshold: float | None = None, title: str | None = None,
                    dpi: int = 100, max_side: int | None = None) -> Path:
    """Overlay predictions (orange, with scores) and ground truth (green) on an image; write a PNG.

    Args:
        path: output PNG path (folders are created).
        image: ``[H, W]``, ``[1, H, W]`` / ``[3, H, W]`` or ``[H, W, 3]`` array or tensor; shown with
            its own min-max range (grey).
        gt_boxes: ``(M, 4)`` xyxy pixel boxes, or None.
        pred_boxes: ``(K, 4)`` xyxy pixel boxes, or None.
        pred_scores: ``(K,)`` scores printed next to the predictions.
        score_threshold: draw only predictions scoring at or above it.
        title: figure title.
        dpi: resolution; the figure keeps the image's pixel size at dpi 100.
        max_side: draw the image (box-averaged) and the boxes scaled so that the longer side is at most this
            many pixels (>= 1); None: the image's own size.

    Raises:
        ValueError: pred_scores do not match pred_boxes, or max_side < 1.

    Returns:
        The path written.
    """
    img = _to_numpy(image).astype(np.float32)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.mean(0)  # [H, W]
    elif img.ndim == 3:
        img = img.mean(-1)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D or 3-D with a channel axis, got shape {img.shape}")
    gt = np.zeros((0, 4)) if gt_boxes is None else _to_numpy(gt_boxes).reshape(-1, 4)
    pb = np.zeros((0, 4)) if pred_boxes is None else _to_numpy(pred_boxes).reshape(-1, 4)
    h, w = img.shape
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1 pixel (None: the image's own size), got {max_side}")
    if max_side is not None and max(h, w) > max_side:
        from PIL import Image

        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))  # (W', H')
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img, np.float32)).resize(size, Image.Resampling.BOX))
        xy = np.array([size[0] / w, size[1] / h] * 2)
        gt, pb = gt * xy, pb * xy
        h, w = img.shape
    ps = None if pred_scores is None else _to_numpy(pred_scores).reshape(-1)
    if ps is not None and len(ps) != len(pb):
        raise ValueError(f"{len(pb)} pred_boxes but {len(ps)} pred_scores")
    if ps is not None and score_threshold is not None:
        keep = ps >= score_threshold
        pb, ps = pb[keep], ps[keep]
    from matplotlib.patches import Rectangle

    fig = _figure(max(w, 64) / 100, max(h, 64) / 100 + (0.3 if title else 0))
    ax = fig.add_axes((0, 0, 1, h / (h + (30 if title else 0))))
    ax.imshow(img, cmap="gray", interpolation="nearest")
    ax.set_axis_off()
    for x1, y1, x2, y2 in gt:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.2))
    for k, (x1, y1, x2, y2) in enumerate(pb):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="orange", lw=1.0, ls="--"))
        if ps is not None:
            ax.text(x1, y1 - 1, f"{ps[k]:.2f}", color="orange", fontsize=6, va="bottom")
    if title:
        fig.suptitle(title, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def save_froc(path: str | Path, results: Mapping[str, Mapping[Any, Any]] | Mapping[Any, Any], *,
              fps_marks: Sequence[float] | None = None, title: str = "FROC", dpi: int = 120) -> Path:
    """Plot one or several FROC curves (results of ``medssl.metrics.detection.froc``) to a PNG.

    Args:
        path: output PNG path.
        results: a single ``froc`` result, or ``{label: result}`` for several curves.
        fps_marks: rates at which to mark ``R@k`` (default: the float keys of each result).
        title: axes title.
        dpi: resolution.

    Returns:
        The path written.
    """
    if "curve" in results:
        results = {"": results}
    fig = _figure(5, 4)
    ax = fig.add_subplot(1, 1, 1)
    for label, res in results.items():
        c = res["curve"]
        fpi, sens = np.asarray(c["fps_per_image"], float), np.asarray(c["sensitivity"], float)
        marks = fps_marks or [k for k in res if isinstance(k, float)]
        name = f"{label} " if label else ""
        line = ax.step(np.maximum(fpi, 1e-3), sens, where="post",
                       label=f"{name}R@0.3={res.get(0.3, float('nan')):.3f}" if 0.3 in res else name or None)
        ax.plot(marks, [res[k] if k in res else np.nan for k in marks], "o", ms=3, color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xlim(1e-2, 8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if any(results):
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
