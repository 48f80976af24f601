"""Detection metrics: FROC lesion sensitivity (MedMask R@k) and COCO AP through pycocotools.

All boxes are ``xyxy`` in pixels. Every function takes one entry per test image, images without
lesions included (they contribute false positives but no lesions).

Example::

    >>> import numpy as np
    >>> from medssl.metrics.detection import froc
    >>> res = froc([np.array([[10, 10, 20, 20.]])], [np.array([0.9])], [np.array([[8, 8, 22, 22.]])])
    >>> res[0.3], res["curve"]["sensitivity"].tolist()
    (1.0, [0.0, 1.0])
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_FPS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 4)

__all__ = ["DEFAULT_FPS", "box_iou_np", "coco_ap", "detection_summary", "froc", "froc_preprocess", "random_boxes",
           "to_coco_results"]


def _as_array(x: Any, name: str, ndim: int, i: int) -> np.ndarray:
    """Convert a numpy array / torch tensor / list to float64 numpy and check its rank."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        a = a.reshape((0, 4) if ndim == 2 else (0,))
    if ndim == 2 and (a.ndim != 2 or a.shape[1] != 4):
        raise ValueError(f"{name}[{i}] must have shape (K, 4) xyxy, got {a.shape}")
    if ndim == 1 and a.ndim != 1:
        raise ValueError(f"{name}[{i}] must have shape (K,), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}[{i}] contains NaN or inf")
    return a


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes ``a`` (K, 4) and ``b`` (M, 4) -> (K, M); zero-area unions give 0."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [K, M, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [K, M, 2]
    wh = np.clip(rb - lt, 0, None)  # [K, M, 2]
    inter = wh[..., 0] * wh[..., 1]  # [K, M]
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # [K]
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # [M]
    union = area_a[:, None] + area_b[None, :] - inter  # [K, M]
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _hits(pred: np.ndarray, gt: np.ndarray, hit: str, iou_threshold: float) -> np.ndarray:
    """Boolean (K, M) matrix: prediction k hits lesion m under the chosen rule."""
    if hit == "center":
        cx = (pred[:, 0] + pred[:, 2]) / 2  # [K]  x centre from x1, x2
        cy = (pred[:, 1] + pred[:, 3]) / 2  # [K]  y centre from y1, y2 (not x: the reference's bug)
        inside_x = (cx[:, None] >= gt[None, :, 0]) & (cx[:, None] <= gt[None, :, 2])  # [K, M]
        inside_y = (cy[:, None] >= gt[None, :, 1]) & (cy[:, None] <= gt[None, :, 3])  # [K, M]
        return inside_x & inside_y
    return box_iou_np(pred, gt) >= iou_threshold


def froc(
    pred_boxes: Sequence[Any],
    pred_scores: Sequence[Any],
    gt_boxes: Sequence[Any],
    *,
    fps_per_image: Sequence[float] = DEFAULT_FPS,
    hit: str = "center",
    iou_threshold: float = 0.5,
) -> dict[Any, Any]:
    """Free-response ROC: lesion sensitivity against false positives per image (MedMask's R@k).

    At a score threshold ``t`` the predictions kept are those with ``score >= t``. A lesion is found
    when a kept prediction hits it; a kept prediction that hits no lesion is a false positive; further
    predictions on an already-found lesion are neither. False positives per image (FPI) are counted
    over ALL images, normal ones included. The threshold sweeps every distinct predicted score (plus
    "keep nothing"). ``R@k`` is the highest sensitivity over the thresholds whose FPI is <= k (0 if
    none qualifies).

    Args:
        pred_boxes: one ``(K_i, 4)`` xyxy pixel array (or tensor) per image.
        pred_scores: one ``(K_i,)`` score array per image (already post-processed, e.g. by
            :func:`froc_preprocess`).
        gt_boxes: one ``(M_i, 4)`` xyxy pixel array per image; ``(0, 4)`` for a normal image.
        fps_per_image: the FPI rates k at which to report sensitivity.
        hit: ``"center"``: a prediction hits a lesion when its centre lies inside the lesion box
            (borders inclusive); ``"iou"``: when their IoU is >= ``iou_threshold``.
        iou_threshold: IoU needed for a hit with ``hit="iou"``.

    Returns:
        ``{k: sensitivity at k for each k in fps_per_image (float keys, so res[1] and res[0.3] work),
        "mean_sensitivity": mean over those k, "num_lesions": int, "num_images": int,
        "curve": {"thresholds": (T,), "sensitivity": (T,), "fps_per_image": (T,)}}``. The curve is
        ordered by decreasing threshold, starting at ``+inf`` (nothing kept: 0, 0). With no lesion
        at all the sensitivities are NaN.

    Raises:
        ValueError: on mismatched list lengths, bad shapes, NaN values or an unknown ``hit`` rule.
    """
    if hit not in ("center", "iou"):
        raise ValueError(f"hit must be 'center' or 'iou', got {hit!r}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if not (len(pred_boxes) == len(pred_scores) == len(gt_boxes)):
        raise ValueError(
            f"pred_boxes, pred_scores and gt_boxes need one entry per image; got lengths "
            f"{len(pred_boxes)}, {len(pred_scores)}, {len(gt_boxes)}"
        )
    if len(gt_boxes) == 0:
        raise ValueError("froc needs at least one image")
    ks = [float(k) for k in fps_per_image]
    if any(k < 0 or not math.isfinite(k) for k in ks):
        raise ValueError(f"fps_per_image must be finite and >= 0, got {tuple(fps_per_image)}")

    lesion_best: list[np.ndarray] = []  # per lesion: best score of a prediction hitting it
    fp_scores: list[np.ndarray] = []  # scores of predictions hitting no lesion
    all_scores: list[np.ndarray] = []
    for i, (pb, ps, gb) in enumerate(zip(pred_boxes, pred_scores, gt_boxes)):
        pb = _as_array(pb, "pred_boxes", 2, i)
        ps = _as_array(ps, "pred_scores", 1, i)
        gb = _as_array(gb, "gt_boxes", 2, i)
        if len(pb) != len(ps):
            raise ValueError(f"image {i}: {len(pb)} boxes but {len(ps)} scores")
        h = _hits(pb, gb, hit, iou_threshold)  # [K, M]
        best = np.where(h, ps[:, None], -np.inf).max(axis=0) if len(pb) else np.full(len(gb), -np.inf)
        lesion_best.append(best)  # [M]
        fp_scores.append(ps[~h.any(axis=1)] if len(gb) else ps)
        all_scores.append(ps)

    best = np.concatenate(lesion_best)  # [sum M]
    fps = np.sort(np.concatenate(fp_scores))  # [F]
    num_images, num_lesions = len(gt_boxes), len(best)
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate(all_scores))[::-1]])  # [T]
    best_sorted = np.sort(best)
    found = len(best_sorted) - np.searchsorted(best_sorted, thresholds, side="left")  # [T] best >= t
    n_fp = len(fps) - np.searchsorted(fps, thresholds, side="left")  # [T] fp score >= t
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = found / num_lesions if num_lesions else np.full(len(thresholds), np.nan)
    fpi = n_fp / num_images

    out: dict[Any, Any] = {}
    for k in ks:
        ok = fpi <= k + 1e-12
        out[k] = float(np.max(sens[ok])) if ok.any() else 0.0
    out["mean_sensitivity"] = float(np.mean([out[k] for k in ks])) if ks else float("nan")
    out["num_lesions"] = int(num_lesions)
    out["num_images"] = int(num_images)
    out["curve"] = {"thresholds": thresholds, "sensitivity": np.asarray(sens, float), "fps_per_image": fpi}
    return out


def froc_preprocess(
    boxes: Any, scores: Any, *, iou_threshold: float = 0.1, logits: bool = False, max_dets: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One image's detections made ready for :func:`froc` as in MedMask (FACTS.md).

    Scores become sigmoid probabilities if ``logits`` is true; per-class scores ``(K, C)`` are reduced
    to the best class; then class-agnostic NMS at ``iou_threshold`` (0.1 in the reference).

    Args:
        boxes: ``(K, 4)`` xyxy pixel boxes.
        scores: ``(K,)`` or ``(K, C)`` scores (probabilities, or logits with ``logits=True``).
        iou_threshold: NMS IoU threshold.
        logits: apply a sigmoid first.
        max_dets: keep at most this many boxes after NMS (highest scores).

    Returns:
        ``(boxes (K', 4), scores (K',))`` float64 numpy arrays sorted by decreasing score.
    """
    import torch
    from torchvision.ops import nms

    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)  # [K, 4]
    s = torch.as_tensor(scores, dtype=torch.float32)
    if s.ndim == 2:
        s = s.max(dim=1).values if not logits else s.sigmoid().max(dim=1).values  # [K]
    elif logits:
        s = s.sigmoid()  # [K]
    if s.ndim != 1 or len(s) != len(b):
        raise ValueError(f"scores must be (K,) or (K, C) with K={len(b)} boxes, got {tuple(s.shape)}")
    keep = nms(b, s, iou_threshold)  # indices sorted by decreasing score
    if max_dets is not None:
        keep = keep[:max_dets]
    return b[keep].double().numpy(), s[keep].double().numpy()


def to_coco_results(
    image_ids: Sequence[int], boxes: Sequence[Any], scores: Sequence[Any], labels: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """Per-image xyxy detections -> COCO result records ``{"image_id", "category_id", "bbox" xywh, "score"}``.

    ``labels`` defaults to category 1 for every box (single-class lesion detection).
    """
    if not (len(image_ids) == len(boxes) == len(scores)):
        raise ValueError("image_ids, boxes and scores need one entry per image")
    res = []
    for i, img_id in enumerate(image_ids):
        b = _as_array(boxes[i], "boxes", 2, i)
        s = _as_array(scores[i], "scores", 1, i)
        lab = np.ones(len(b), dtype=np.int64) if labels is None else np.asarray(labels[i]).reshape(-1)
        for (x1, y1, x2, y2), sc, c in zip(b, s, lab):
            res.append({"image_id": int(img_id), "category_id": int(c),
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(sc)})
    return res


def coco_ap(coco_gt: dict[str, Any] | str, results: list[dict[str, Any]], *, class_agnostic: bool = False
            ) -> dict[str, float]:
    """COCO box AP through pycocotools.

    Args:
        coco_gt: a COCO ground-truth dict (or the path of a COCO json file).
        results: COCO result records (see :func:`to_coco_results`).
        class_agnostic: ignore categories (pycocotools ``useCats=0``).

    Returns:
        ``{"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR100"}`` in [0, 1]; AP is 0 when
        there are no predictions, -1 where pycocotools has no ground truth for a size range.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # pragma: no cover - pycocotools is in the detection extra
        raise ImportError("coco_ap needs pycocotools: pip install 'medssl[detection]'") from e
    import copy
    import json

    if isinstance(coco_gt, str):
        with open(coco_gt) as f:
            coco_gt = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in coco_gt:
            raise ValueError(f"coco_gt lacks the {key!r} list")
    names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"]
    if not results:
        return {**{n: 0.0 for n in names}, "AR100": 0.0}
    gt = COCO()
    gt.dataset = copy.deepcopy(coco_gt)
    gt.dataset.setdefault("info", {})
    for a in gt.dataset["annotations"]:  # pycocotools needs area and iscrowd
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        a.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.useCats = 0 if class_agnostic else 1
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {n: float(v) for n, v in zip(names, ev.stats[:6])}
    out["AR100"] = float(ev.stats[8])
    return out


def random_boxes(image_sizes: Sequence[tuple[int, int]], box_wh: Any, *, boxes_per_image: int = 10,
                 seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The random baseline: boxes placed uniformly at random with uniform scores.

    Box sizes are drawn from ``box_wh`` (``(N, 2)`` widths/heights, e.g. the training lesions), so the
    baseline differs from a detector only in where it looks.

    Args:
        image_sizes: ``(height, width)`` per image.
        box_wh: ``(N, 2)`` array of box widths and heights to sample from (N >= 1).
        boxes_per_image: boxes per image.
        seed: random seed.

    Returns:
        ``(boxes, scores)`` lists with one ``(K, 4)`` xyxy / ``(K,)`` array per image, for :func:`froc`.
    """
    wh = np.asarray(box_wh, dtype=np.float64).reshape(-1, 2)
    if len(wh) == 0 or (wh <= 0).any():
        raise ValueError(f"box_wh needs at least one positive (w, h) pair, got shape {wh.shape}")
    rng = np.random.default_rng(seed)
    boxes, scores = [], []
    for h, w in image_sizes:
        size = wh[rng.integers(len(wh), size=boxes_per_image)]  # [K, 2]
        size = np.minimum(size, [w, h])
        x0 = rng.uniform(0, 1, boxes_per_image) * (w - size[:, 0])  # [K]
        y0 = rng.uniform(0, 1, boxes_per_image) * (h - size[:, 1])  # [K]
        boxes.append(np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], axis=1))  # [K, 4]
        scores.append(rng.uniform(0, 1, boxes_per_image))
    return boxes, scores


def detection_summary(pred_boxes: Sequence[Any], pred_scores: Sequence[Any], gt_boxes: Sequence[Any], *,
                      coco_gt: dict[str, Any] | None = None, image_ids: Sequence[int] | None = None,
                      fps_per_image: Sequence[float] = DEFAULT_FPS, hit: str = "center",
                      iou_threshold: float = 0.5) -> dict[str, float]:
    """FROC sensitivities and (with ``coco_gt`` + ``image_ids``) COCO AP in one flat, JSON-ready dict.

    Keys: ``"R@<k>"`` for each rate (e.g. ``"R@0.3"``), ``"mean_sensitivity"``, ``"num_images"``,
    ``"num_lesions"``, and ``"AP"``, ``"AP50"``, ``"AP75"`` when ``coco_gt`` is given (predictions
    counted as category 1 of the COCO file's first category, class-agnostic evaluation).
    """
    res = froc(pred_boxes, pred_scores, gt_boxes, fps_per_image=fps_per_image, hit=hit,
               iou_threshold=iou_threshold)
    out: dict[str, float] = {f"R@{k:g}": float(res[float(k)]) for k in fps_per_image}
    out.update(mean_sensitivity=res["mean_sensitivity"], num_images=res["num_images"],
               num_lesions=res["num_lesions"])
    if coco_gt is not None:
        if image_ids is None or len(image_ids) != len(pred_boxes):
            raise ValueError("detection_summary needs image_ids (one per image) together with coco_gt")
        cat = int(coco_gt["categories"][0]["id"]) if coco_gt.get("categories") else 1
        labels = [np.full(len(_as_array(s, "pred_scores", 1, i)), cat) for i, s in enumerate(pred_scores)]
        ap = coco_ap(coco_gt, to_coco_results(image_ids, pred_boxes, pred_scores, labels), class_agnostic=True)
        out.update(AP=ap["AP"], AP50=ap["AP50"], AP75=ap["AP75"])
    return out
