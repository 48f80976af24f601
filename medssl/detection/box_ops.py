"""Box format conversions and inverse sigmoid for the detector (boxes are ``(..., 4)`` tensors)."""

from __future__ import annotations

import torch
from torchvision.ops import generalized_box_iou

__all__ = ["cxcywh_to_xyxy", "generalized_box_iou", "inverse_sigmoid", "normalize_xyxy", "xyxy_to_cxcywh"]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1), any leading shape."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x0, y0, x1, y1) -> (cx, cy, w, h), any leading shape."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def normalize_xyxy(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel xyxy boxes -> normalised cxcywh in [0, 1] of an image of the given size."""
    scale = boxes.new_tensor([width, height, width, height])
    return xyxy_to_cxcywh(boxes / scale)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [eps, 1 - eps] (for refining boxes in logit space)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
