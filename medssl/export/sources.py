"""Read what to export: a backbone source, a transfer-head checkpoint or a MedMask detector checkpoint.

Everything is read through the hub and the one checkpoint reader (`medssl.hub.load_backbone`,
`medssl.heads.build.load_head`, `medssl.detection.predict.load_detector`); this module only wraps the model
in its export graph (`medssl.export.graphs`) and records what a runner and a model card need to know.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.export.graphs import BackboneGraph, DetectorGraph, HeadGraph, make_vit_dynamic
from medssl.train.checkpoint import load_checkpoint

__all__ = ["Exportable", "load_exportable"]

KINDS = ("backbone", "classify", "segment", "detector")


@dataclass
class Exportable:
    """A model ready for export.

    Attributes:
        kind: one of `KINDS`.
        graph: the wrapped model (eval mode), inputs in [0, 1] intensities.
        input_names / output_names: graph input and output names.
        in_chans: input channels.
        size: (H, W) the model was built for (the probe size, and the fixed size where H/W are not dynamic).
        dynamic_hw: whether H and W may change (a ViT's position embedding is resampled in the graph; the
            detector's levels, reference points and sampling follow the input's size).
        multiple: H and W should be multiples of this (the ViT's patch size; 32 for the detector's padding).
        Detector inputs need H, W >= 64 (its coarsest level, stride 64, must not be empty).
        source: what was read (path or registered name).
        meta: mean/std, architecture, provenance, classes, metrics, data config... for the JSON and the card.
    """

    kind: str
    graph: nn.Module
    input_names: list[str]
    output_names: list[str]
    in_chans: int
    size: tuple[int, int]
    dynamic_hw: bool
    multiple: int
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def probe(self, batch: int, size: tuple[int, int] | None = None, seed: int = 0,
              pad_to: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
        """Random probe inputs in [0, 1]: ``(images,)`` or, for the detector, ``(images, mask)``.

        For the detector, image ``i`` covers ``size`` (default: all of the canvas) and the rest of the
        ``pad_to`` canvas (default ``self.size``) is padding, zero and masked.
        """
        g = torch.Generator().manual_seed(seed)
        h, w = size or self.size
        if self.kind != "detector":
            return (torch.rand(batch, self.in_chans, h, w, generator=g),)
        ch, cw = pad_to or self.size
        if h > ch or w > cw:
            raise ValueError(f"probe size {(h, w)} larger than the detector's canvas {(ch, cw)}")
        images = torch.zeros(batch, self.in_chans, ch, cw)
        mask = torch.ones(batch, ch, cw, dtype=torch.bool)
        images[:, :, :h, :w] = torch.rand(batch, self.in_chans, h, w, generator=g)
        mask[:, :h, :w] = False
        return images, mask


def _read(path: Path) -> dict[str, Any] | None:
    """The checkpoint dict of a `.pt` / `.pth` file, or None when `path` is something else."""
    if not (path.is_file() and path.suffix in (".pt", ".pth")):
        return None
    ck = load_checkpoint(path)
    return ck if isinstance(ck, dict) else None


def load_exportable(source: str | os.PathLike, *, size: tuple[int, int] | None = None, top_k: int | None = None,
                    static: bool = False) -> Exportable:
    """Wrap a backbone source, a transfer head (`head.pt` / `model.pt` / `best.pt` with a record) or a MedMask
    detector checkpoint for export.

    Args:
        source: anything `medssl.load_backbone` accepts, or a head / detector checkpoint.
        size: (H, W) to build for (backbone), the detector's nominal size (default: its `data.max_size` square,
            rounded up to 32); with `static`, the one size the graph takes.
        top_k: detections per image in the detector graph (default: the run's `eval.max_dets`, else 100).
        static: fix H and W in the graph (for runtimes that want static shapes); batch stays dynamic.
    """
    path = Path(source)
    ck = _read(path)
    if ck is not None and "detector" in ck and "model" in ck:
        exp = _detector(path, ck, size, top_k)
    elif ck is not None and "record" in ck and "model" in ck:
        exp = _head(path)
    else:
        exp = _backbone(source, size)
    exp.dynamic_hw = exp.dynamic_hw and not static
    return exp


def _backbone(source: str | os.PathLike, size: tuple[int, int] | None) -> Exportable:
    from medssl.hub import load_backbone

    vit = load_backbone(source, img_size=size, dynamic_img_size=True).eval()
    cfg = dict(vit.medssl_cfg)
    h, w = cfg["img_size"]
    return Exportable("backbone", BackboneGraph(vit, cfg["mean"], cfg["std"]).eval(), ["images"], ["embedding"],
                      int(cfg["in_chans"]), (int(h), int(w)), True, int(cfg["patch_size"]), str(source),
                      {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "backbone": cfg,
                       "embed_dim": int(cfg["embed_dim"])})


def _head(path: Path) -> Exportable:
    from medssl.heads.build import load_head

    model, ck = load_head(path)
    rec = ck["record"]
    vit = model.backbone
    make_vit_dynamic(vit)
    cfg = dict(vit.medssl_cfg)
    kind = rec["kind"]
    out = "logits"
    extra = {k: ck[k] for k in ("classes", "metrics", "epoch") if k in ck}
    return Exportable(kind, HeadGraph(model, cfg["mean"], cfg["std"]).eval(), ["images"], [out],
                      int(rec["in_chans"]), (int(rec["img_size"]), int(rec["img_size"])), True,
                      int(cfg["patch_size"]), str(path),
                      {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "record": rec, "backbone": cfg,
                       "num_classes": int(rec["num_classes"]), **extra})


def _detector(path: Path, ck: dict[str, Any], size: tuple[int, int] | None, top_k: int | None) -> Exportable:
    from medssl.detection.config import DEFAULTS
    from medssl.detection.deformable_attn import set_attn_impl
    from medssl.detection.predict import load_detector

    model, data = load_detector(path)
    data = {**DEFAULTS["data"], **data}
    set_attn_impl(model, "export")  # gather-based form: no custom op, no grid_sample in the graph
    c = int(data["in_chans"])
    mean, std = list(data["mean"]), list(data["std"])
    mean, std = (mean * c if len(mean) == 1 else mean), (std * c if len(std) == 1 else std)
    if size is None:
        side = -(-int(data["max_size"]) // 32) * 32
        size = (side, side)
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"{path}: detector size {size} must be multiples of 32 (the training padding)")
    k = int(top_k or DEFAULTS["eval"]["max_dets"])
    graph = DetectorGraph(model, mean, std, k).eval()
    det = dict(ck["detector"])
    return Exportable("detector", graph, ["images", "mask"], ["scores", "labels", "boxes", "index"], c,
                      (int(size[0]), int(size[1])), True, 32, str(path),
                      {"mean": mean, "std": std, "detector": det, "data": data, "top_k": k,
                       "stage": ck.get("stage"), "epoch": ck.get("epoch"), "metrics": ck.get("metrics", {}),
                       "resize": {"max_size": data["max_size"], "sizes": data["sizes"]}})
