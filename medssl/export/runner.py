"""Run an exported model on image files by following its `medssl_export.json`, and re-check parity on them.

- `OnnxModel(folder)`: the session and the JSON; `prepare(raw)` turns a `[H, W]` image in [0, 1] into the
  graph's inputs (resize, grey to channels, pad + mask for the detector), `run(feeds)` runs it.
- `predict_onnx`: the detector's `predict` through ONNX Runtime (same JSON and overlays as
  `medssl.detection.predict.predict_files`).
- `check`: ONNX Runtime against the PyTorch model the export came from, on the user's images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medssl.detection.predict import OVERLAY_MAX_SIDE, image_files, predict_each
from medssl.export.onnx import DEFAULT_RTOL, META_NAME, onnx_session, parity

__all__ = ["DEFAULT_RTOL", "OnnxModel", "check", "predict_onnx", "read_meta"]


def read_meta(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """(export JSON, ONNX file) of an export folder, or of an `.onnx` file with the JSON beside it."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta_file = folder / META_NAME
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: no export record; export with `python -m medssl.export`")
    meta = json.loads(meta_file.read_text())
    return meta, (path if path.is_file() else folder / meta["file"])


class OnnxModel:
    """An exported medssl model in ONNX Runtime, with the pre-processing its JSON states."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.meta, self.file = read_meta(path)
        self.session = onnx_session(self.file, threads)
        self.kind = self.meta["kind"]

    def prepare(self, raws: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Graph inputs for grey images ``[H, W]`` in [0, 1] (a batch; the detector pads them into its canvas)."""
        pre = self.meta["preprocess"]
        c = int(pre["channels"])
        if self.kind == "detector":
            from medssl.data.coco import make_transforms

            r = pre["resize"]
            tf = make_transforms("none", max_size=r["max_size"], sizes=r["sizes"], in_chans=c, mean=[0.0] * c,
                                 std=[1.0] * c)
            imgs = [tf(torch.from_numpy(np.asarray(raw, np.float32))[None],
                       {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})[0] for raw in raws]  # [C, h, w] each
            if "canvas" in pre:  # a graph with fixed H, W
                ch, cw = pre["canvas"]
            else:
                k, low = int(pre.get("pad_to_multiple", 32)), int(pre.get("min_size", 64))
                ch, cw = (max(low, -(-max(int(im.shape[d]) for im in imgs) // k) * k) for d in (1, 2))
            images = np.zeros((len(raws), c, ch, cw), np.float32)
            mask = np.ones((len(raws), ch, cw), bool)
            for i, img in enumerate(imgs):
                h, w = img.shape[-2:]
                if h > ch or w > cw:
                    raise ValueError(f"{self.file}: image resized to {(h, w)} does not fit the canvas {(ch, cw)}")
                images[i, :, :h, :w] = img.numpy()
                mask[i, :h, :w] = False
            return {"images": images, "mask": mask}
        h, w = self.meta["size"]
        batch = torch.stack([torch.from_numpy(np.asarray(r, np.float32))[None] for r in raws])  # [N, 1, H, W]
        batch = F.interpolate(batch, size=(int(h), int(w)), mode="bilinear", align_corners=False, antialias=True)
        return {"images": batch.repeat(1, c, 1, 1).numpy()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; returns its outputs by name."""
        names = self.meta["outputs"]
        return dict(zip(names, self.session.run(names, feeds)))


@torch.no_grad()
def predict_onnx(onnx_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 score_threshold: float = 0.3, nms_iou: float = 0.1, overlays: bool = True,
                 overlay_max_side: int | None = OVERLAY_MAX_SIDE) -> list[dict[str, Any]]:
    """Detect lesions with an exported detector; writes ``predictions.json`` and, with `overlays`, one overlay PNG
    per image, through the loop of `medssl.detection.predict.predict_files` (`predict_each`: overlays at most
    `overlay_max_side` pixels, unreadable files recorded in ``skipped.json`` and skipped).

    Returns:
        per image ``{"file", "boxes" (xyxy pixels), "scores", "seconds"}`` after class-agnostic NMS at `nms_iou`,
        as `medssl.detection.predict.predict_files` does with the PyTorch model.
    """
    from medssl.metrics.detection import froc_preprocess

    model = OnnxModel(onnx_path)
    if model.kind != "detector":
        raise ValueError(f"{model.file}: a {model.kind} export, not a detector")

    def detect(raw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = model.run(model.prepare([raw]))
        h, w = raw.shape
        boxes = torch.from_numpy(out["boxes"][0]) * torch.tensor([w, h, w, h], dtype=torch.float32)
        return froc_preprocess(boxes, torch.from_numpy(out["scores"][0]), iou_threshold=nms_iou)

    return predict_each(image_files(inputs), detect, out_dir, score_threshold, overlays, overlay_max_side,
                        tag="ONNX, ")


def check(folder: str | os.PathLike, images: Sequence[str | os.PathLike] = (), source: str | None = None,
          rtol: float | None = None) -> list[dict[str, Any]]:
    """Re-run the parity check of an export on the user's images (random probes when none are given).

    The PyTorch side is rebuilt from the export's source (or `source`, where the files have moved).

    Returns:
        one parity record per image (``file``, ``max_abs_diff``, ``tolerance``, ``ok``).
    """
    from medssl.data.coco import read_image
    from medssl.export.onnx import probe_inputs
    from medssl.export.sources import load_exportable

    model = OnnxModel(folder)
    meta = model.meta
    rtol = rtol if rtol is not None else meta["parity"]["rtol"]
    src = source or meta["source"]
    exp = load_exportable(src, size=tuple(meta["size"]), top_k=meta["model"].get("top_k"),
                          static=not meta["dynamic"]["height_width"])
    records = []
    if images:
        for f in image_files(images):
            feeds = model.prepare([read_image(f)])
            inputs = tuple(torch.from_numpy(feeds[n]) for n in exp.input_names)
            records.append({"file": str(f), **parity(model.session, exp, inputs, rtol)})
    else:
        records = [{"file": None, **parity(model.session, exp, p, rtol)} for p in probe_inputs(exp)]
    return records

