"""Scoring a detector: predictions over a split (sharded across ranks, gathered), FROC R@k + COCO AP, the
random-box baseline, the operating threshold, overlays, and the held-out test table of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl.data.coco import build_dataset, read_image
from medssl.detection.data import eval_loader, transforms
from medssl.detection.detr import DeformableDETR, postprocess
from medssl.metrics.detection import detection_summary, froc, froc_preprocess, random_boxes
from medssl.train.dist import DistInfo, all_gather_objects

__all__ = ["evaluate", "heldout_results", "operating_threshold", "predict_dataset", "pseudo_label_quality",
           "random_baseline", "save_overlays"]


@torch.no_grad()
def predict_dataset(model: DeformableDETR, ds: Dataset, cfg: dict, device: torch.device,
                    dist: DistInfo | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Boxes (original pixels, after FROC NMS) and scores for every image of ``ds``, and its indices.

    With several ranks each predicts every ``world_size``-th image and the results are gathered, so that
    every rank returns the whole split in index order.
    """
    model.eval()
    ev = cfg["eval"]
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    dtype = next(model.parameters()).dtype
    mine: list[tuple[int, np.ndarray, np.ndarray]] = []
    for images, mask, targets in eval_loader(ds, cfg["data"]["batch_size"], list(range(rank, len(ds), world))):
        out = model(images.to(device, dtype), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets])  # [N, 2] (h, w)
        for det, t in zip(postprocess(out, sizes, ev["max_dets"]), targets):
            b, s = froc_preprocess(det["boxes"].float().cpu(), det["scores"].float().cpu(),
                                   iou_threshold=ev["nms_iou"])
            mine.append((int(t["index"]), b, s))
    gathered = sorted((p for part in all_gather_objects(mine, dist or DistInfo()) for p in part), key=lambda p: p[0])
    return [p[1] for p in gathered], [p[2] for p in gathered], [p[0] for p in gathered]


def _score(ds: Dataset, boxes: list, scores: list, order: list[int], cfg: dict) -> tuple[dict, dict]:
    gts = [ds.gt_boxes_xyxy(i) for i in order]
    ids = [int(ds.images[i]["id"]) for i in order]
    ev = cfg["eval"]
    summary = detection_summary(boxes, scores, gts, coco_gt=ds.coco, image_ids=ids, hit=ev["hit"],
                                iou_threshold=ev["iou_threshold"])
    return summary, froc(boxes, scores, gts, hit=ev["hit"], iou_threshold=ev["iou_threshold"])


def evaluate(model: DeformableDETR, ds: Dataset, cfg: dict, device: torch.device, dist: DistInfo | None = None
             ) -> tuple[dict, dict, list]:
    """FROC sensitivities and COCO AP on a labelled dataset (the whole of it, whatever the ranks).

    Returns:
        (flat summary ``{"R@0.3": ..., "AP50": ...}``, full ``froc`` result, per-image predictions).
    """
    boxes, scores, order = predict_dataset(model, ds, cfg, device, dist)
    summary, curve = _score(ds, boxes, scores, order, cfg)
    return summary, curve, list(zip(order, boxes, scores))


def random_baseline(train: Dataset, val: Dataset, cfg: dict, seed: int = 0) -> tuple[dict, dict]:
    """FROC/AP of boxes placed at random (sizes drawn from the training lesions) on the val images."""
    wh = [b[:, 2:] - b[:, :2] for b in (train.gt_boxes_xyxy(i) for i in range(len(train))) if len(b)]
    wh = np.concatenate(wh) if wh else np.array([[32.0, 32.0]])
    sizes = [(int(im["height"]), int(im["width"])) for im in val.images]
    boxes, scores = random_boxes(sizes, wh, boxes_per_image=cfg["eval"]["random_boxes_per_image"], seed=seed)
    return _score(val, boxes, scores, list(range(len(val))), cfg)


def operating_threshold(curve: dict, fps_per_image: float) -> float:
    """The lowest score threshold whose false positives per image stay within ``fps_per_image``."""
    c = curve["curve"]
    ok = np.isfinite(c["thresholds"]) & (c["fps_per_image"] <= fps_per_image + 1e-12)
    return float(c["thresholds"][ok].min()) if ok.any() else 1.0


def save_overlays(ds: Dataset, preds: list, out_dir: Path, n: int, score_threshold: float = 0.3) -> list[str]:
    """PNG overlays (ground truth vs predictions scoring >= ``score_threshold``), images with lesions first."""
    from medssl.viz import save_detections

    written = []
    with_lesions = [p for p in preds if len(ds.gt_boxes_xyxy(p[0]))] + [p for p in preds
                                                                        if not len(ds.gt_boxes_xyxy(p[0]))]
    for idx, boxes, scores in with_lesions[:n]:
        img = read_image(ds.file_of(idx))
        path = out_dir / f"{Path(ds.file_of(idx)).stem}.png"
        save_detections(path, img, gt_boxes=ds.gt_boxes_xyxy(idx), pred_boxes=boxes, pred_scores=scores,
                        score_threshold=score_threshold, title=f"{path.stem} (scores >= {score_threshold:.2f})")
        written.append(str(path))
    return written


def heldout_results(cfg: dict, train: Dataset, checkpoints: dict[str, Path], dist: DistInfo | None = None
                    ) -> dict[str, Any]:
    """Each stage's best checkpoint and the random boxes on the held-out ``eval.test_split`` (if present)."""
    from medssl.data.coco import DatasetNotFoundError
    from medssl.detection.predict import load_detector

    name = cfg["eval"]["test_split"]
    if not name:
        return {}
    try:
        test = build_dataset(cfg["data"]["dataset"], name, cfg["data"]["data_root"], transforms(cfg, "none"))
    except (DatasetNotFoundError, ValueError) as e:
        if dist is None or dist.is_main:
            print(f"no held-out evaluation: {str(e).splitlines()[0]}")
        return {}
    if not hasattr(test, "gt_boxes_xyxy") or not hasattr(test, "coco"):
        return {}
    device = dist.device if dist is not None else torch.device("cpu")
    out: dict[str, Any] = {"random_boxes": random_baseline(train, test, cfg, seed=cfg["seed"])[0]}
    for stage, ckpt in checkpoints.items():
        model, _ = load_detector(ckpt, device)
        out[stage] = evaluate(model, test, cfg, device, dist)[0]
    return out


@torch.no_grad()
def pseudo_label_quality(teacher: DeformableDETR, ds: Dataset, cfg: dict, threshold: float, nms_iou: float,
                         device: torch.device, iou: float = 0.5) -> dict[str, float]:
    """Precision and recall of the pseudo-labels ``teacher`` would give on ``ds`` (a labelled copy of the
    unlabelled target pool: a diagnostic, never a training signal).

    Pseudo-labels as in teaching (:func:`medssl.detection.medmask.pseudo_labels`: score above ``threshold``,
    class-agnostic NMS at ``nms_iou``) on the un-augmented images. Pseudo boxes are matched one-to-one to
    true boxes, highest score first (IoU >= ``iou``): matched pseudo boxes are correct, matched true boxes
    recalled; a second box on the same lesion counts as wrong.

    Returns:
        ``{"pseudo_precision", "pseudo_recall", "pseudo_per_image", "true_per_image"}`` (precision is NaN
        when no pseudo-label was given).
    """
    from torchvision.ops import box_iou

    from medssl.detection.box_ops import cxcywh_to_xyxy
    from medssl.detection.medmask import pseudo_labels

    teacher.eval()
    dtype = next(teacher.parameters()).dtype
    n_pseudo = n_matched = n_true = n_images = 0  # one-to-one: matched pseudo boxes = recalled true boxes
    for images, mask, targets in eval_loader(ds, cfg["data"]["batch_size"]):
        pl = pseudo_labels(teacher(images.to(device, dtype), mask.to(device)), threshold, nms_iou)
        for p, t in zip(pl, targets):
            pred = cxcywh_to_xyxy(p["boxes"].float().cpu())  # normalised: IoU is unchanged by the image scale
            true = cxcywh_to_xyxy(t["boxes"].float())
            n_images += 1
            n_pseudo += len(pred)
            n_true += len(true)
            if len(pred) and len(true):  # greedy one-to-one: a second box on the same lesion is not correct
                ious = box_iou(pred, true)  # [k, m]
                taken = torch.zeros(len(true), dtype=torch.bool)
                for k in torch.argsort(p["scores"].float().cpu(), descending=True).tolist():
                    free = torch.where(taken, torch.full_like(ious[k], -1.0), ious[k])
                    j = int(free.argmax())
                    if free[j] >= iou:
                        taken[j] = True
                n_matched += int(taken.sum())
    return {"pseudo_precision": n_matched / n_pseudo if n_pseudo else float("nan"),
            "pseudo_recall": n_matched / n_true if n_true else float("nan"),
            "pseudo_per_image": n_pseudo / max(n_images, 1), "true_per_image": n_true / max(n_images, 1)}
