"""What gets exported: a medssl model wrapped with its pre/post-processing, as one graph.

Each wrapper takes raw intensities in [0, 1] (what the shards and `medssl.data.coco.read_image` give, the grey
channel repeated to the model's channels) and applies the model's own intensity normalisation inside the
graph, so that a runner needs no medssl code to prepare an image beyond resizing and padding.

- `BackboneGraph`: images -> pooled embedding `[N, D]` (the timm ViT's `forward`).
- `HeadGraph`: images -> logits of a transfer head (`[N, K]` classification, `[N, K, H, W]` segmentation).
- `DetectorGraph`: images + padding mask -> top-k `scores`, `labels`, `boxes` (xyxy, normalised to the
  unpadded image) and `index` (query * classes + class), the detector's `postprocess` in the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medssl.detection.box_ops import cxcywh_to_xyxy

__all__ = ["BackboneGraph", "DetectorGraph", "HeadGraph", "make_vit_dynamic"]


def make_vit_dynamic(vit: nn.Module) -> nn.Module:
    """Let a timm ViT built for one size take any size (the position embedding resampled bicubically).

    The same switch as building it with ``dynamic_img_size=True``: the patch embedding keeps the NHWC grid
    and stops checking the size. At the size it was built for the outputs do not change.
    """
    from timm.layers import Format

    pe = vit.patch_embed
    vit.dynamic_img_size = True
    pe.strict_img_size, pe.flatten, pe.output_fmt = False, False, Format.NHWC
    return vit


class _Normalise(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # [N, C, H, W]


class BackboneGraph(nn.Module):
    """Intensities ``[N, C, H, W]`` in [0, 1] -> normalised -> ViT -> embedding ``[N, D]``."""

    def __init__(self, vit: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.norm, self.model = _Normalise(mean, std), vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.norm(images))


class HeadGraph(BackboneGraph):
    """Intensities -> normalised -> transfer head -> logits (the model's own output)."""


class DetectorGraph(nn.Module):
    """Intensities ``[N, C, H, W]`` + padding mask ``[N, H, W]`` (True on padding) -> top-k detections.

    Padding is zero after normalisation, as in training (`collate_detection` pads normalised images).

    Returns:
        ``scores [N, k]`` sigmoid, ``labels [N, k]`` int64, ``boxes [N, k, 4]`` xyxy in [0, 1] of the
        unpadded image (multiply by its width / height), ``index [N, k]`` = query * classes + class.
    """

    def __init__(self, detector: nn.Module, mean: Sequence[float], std: Sequence[float], top_k: int) -> None:
        super().__init__()
        self.norm, self.model, self.top_k = _Normalise(mean, std), detector, int(top_k)

    def forward(self, images: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.norm(images).masked_fill(mask[:, None], 0.0)  # [N, C, H, W]
        out = self.model(x, mask)
        logits, boxes = out["pred_logits"], out["pred_boxes"]  # [N, Q, K], [N, Q, 4]
        q, k = logits.shape[1:]
        scores, index = logits.sigmoid().flatten(1).topk(min(self.top_k, q * k), dim=1)  # [N, top]
        xyxy = cxcywh_to_xyxy(boxes).gather(1, (index // k)[..., None].expand(-1, -1, 4))  # [N, top, 4]
        return scores, index % k, xyxy, index
