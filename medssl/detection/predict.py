"""Detectors from their checkpoints alone, and lesion detection on image files."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from medssl.data.coco import read_image
from medssl.detection.config import DEFAULTS
from medssl.detection.data import PAD_MULTIPLE, transforms
from medssl.detection.detr import DeformableDETR, DetrConfig, build_detector, postprocess
from medssl.metrics.detection import froc_preprocess
from medssl.train.checkpoint import load_checkpoint, load_exact
from medssl.train.dist import resolve_device

__all__ = ["OVERLAY_MAX_SIDE", "PAD_MULTIPLE", "image_files", "load_detector", "predict_each", "predict_files"]

log = logging.getLogger("medssl")

OVERLAY_MAX_SIDE = 2048  # predict's overlay PNGs: longer side in pixels (benchmarks/bench_predict.py: drawn whole)


def load_detector(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[DeformableDETR, dict]:
    """Detector and its data config from a stage checkpoint, and nothing else.

    The checkpoint holds the detector's config (with the ViT backbone's architecture record) and every
    weight, so this works wherever the backbone the detector was trained from is gone.
    """
    ck = load_checkpoint(checkpoint)
    if "detector" not in ck or "model" not in ck:
        raise ValueError(f"{checkpoint}: not a medssl detector checkpoint (no 'detector'/'model' entries)")
    known = {f.name for f in fields(DetrConfig)}
    model = build_detector({k: v for k, v in ck["detector"].items() if k in known})
    load_exact(model, ck["model"], str(checkpoint))
    return model.to(resolve_device(device)).eval(), ck.get("data", {})


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by `inputs`: files as given, folders searched recursively for image suffixes.

    Raises:
        FileNotFoundError: an input does not exist, or nothing found is an image.
    """
    from medssl.data.coco import IMAGE_EXTS

    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input image or folder not found: {item}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {[str(i) for i in inputs]}")
    return files


@torch.no_grad()
def predict_each(files: Sequence[Path], detect: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                 out_dir: str | Path, score_threshold: float = 0.3, overlays: bool = True,
                 overlay_max_side: int | None = OVERLAY_MAX_SIDE, tag: str = "") -> list[dict[str, Any]]:
    """The batch loop of every predict path: read each file, ``detect(image [H, W] in [0, 1]) -> (boxes xyxy in
    the file's pixels, scores)`` after NMS, draw the overlay (longer side at most `overlay_max_side`; None: the
    image's own size), record. A file that cannot be read or detected on is recorded in ``skipped.json`` (file and
    reason) and the others go on; ``predictions.json`` holds the rest.

    Returns:
        per image ``{"file", "boxes", "scores", "seconds"}`` (seconds: read, decode, detect and overlay).
    """
    from medssl.viz import save_detections

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, skipped = [], []
    for f in files:
        t0 = time.perf_counter()
        try:
            raw = read_image(f)  # [H, W] in [0, 1]
            b, s = detect(raw)
        except Exception as exc:  # noqa: BLE001 - one bad file must not end a batch of thousands
            skipped.append({"file": str(f), "reason": f"{type(exc).__name__}: {exc}"})
            log.warning("predict: skipping %s: %s", f, skipped[-1]["reason"])
            continue
        if overlays:
            save_detections(out_dir / f"{f.stem}_pred.png", raw, pred_boxes=b, pred_scores=s,
                            score_threshold=score_threshold, title=f"{f.name} ({tag}scores >= {score_threshold})",
                            max_side=overlay_max_side)
        results.append({"file": str(f), "boxes": b.round(1).tolist(), "scores": s.round(4).tolist(),
                        "seconds": round(time.perf_counter() - t0, 3)})
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=1))
    (out_dir / "skipped.json").unlink(missing_ok=True)  # a list from an earlier run in this folder is not ours
    if skipped:
        (out_dir / "skipped.json").write_text(json.dumps(skipped, indent=1))
    return results


@torch.no_grad()
def predict_files(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                  score_threshold: float = 0.3, device: str = "cpu", overlays: bool = True,
                  overlay_max_side: int | None = OVERLAY_MAX_SIDE) -> list[dict[str, Any]]:
    """Detect lesions in image files or folders; writes ``predictions.json`` and, with `overlays`, one overlay PNG
    each, drawn with its longer side at most `overlay_max_side` pixels (None: the image's own size; the boxes in
    ``predictions.json`` are always in the file's own pixels).

    Images of any size and aspect ratio are resized as in training (longest side ``data.max_size``) and padded
    bottom / right to a multiple of 32 with a padding mask, exactly as evaluation batches them, so a ViT
    backbone gets whole patches. A file that cannot be read or detected on is recorded in ``skipped.json``
    (file and reason) and the others go on (`predict_each`).

    Returns:
        per image ``{"file", "boxes" (xyxy pixels), "scores", "seconds"}`` (after FROC NMS, all scores kept;
        seconds: read, decode, resize, forward, NMS and overlay).
    """
    from medssl.data.coco import collate_detection

    files = image_files(inputs)
    dev = resolve_device(device)
    model, data = load_detector(checkpoint, dev)
    cfg = {"data": {**DEFAULTS["data"], **data}, "eval": DEFAULTS["eval"]}
    tf = transforms(cfg, "none")

    def detect(raw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        img, _ = tf(torch.from_numpy(raw)[None], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
        images, mask, _ = collate_detection([(img, {})], pad_to_multiple=PAD_MULTIPLE)  # [1, C, H', W']
        (det,) = postprocess(model(images.to(dev), mask.to(dev)), torch.tensor([raw.shape]), cfg["eval"]["max_dets"])
        return froc_preprocess(det["boxes"].cpu(), det["scores"].cpu(), iou_threshold=cfg["eval"]["nms_iou"])

    return predict_each(files, detect, out_dir, score_threshold, overlays, overlay_max_side)
