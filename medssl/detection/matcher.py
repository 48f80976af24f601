"""Hungarian matching of predicted boxes to ground truth (Deformable DETR costs)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from medssl.detection.box_ops import cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_class_cost"]


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                     gamma: float = 2.0) -> torch.Tensor:
    """Focal-style classification cost ``(Q, K)``: positive minus negative focal term of each label.

    Args:
        logits: ``(Q, C)`` class logits.
        labels: ``(K,)`` target labels.
    """
    prob = logits.sigmoid()[:, labels]  # [Q, K]
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``w_class*focal + w_bbox*L1(cxcywh) - w_giou*GIoU``.

    Args:
        cost_class, cost_bbox, cost_giou: cost weights (reference: 2, 5, 2).
        alpha, gamma: focal parameters of the class cost.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    tgt_boxes: torch.Tensor) -> torch.Tensor:
        """Cost ``(Q, K)`` of one image; boxes are normalised cxcywh."""
        c_cls = focal_class_cost(logits, labels, self.alpha, self.gamma)  # [Q, K]
        c_box = torch.cdist(boxes, tgt_boxes, p=1)  # [Q, K]
        c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))  # [Q, K]
        return self.cost_bbox * c_box + self.cost_class * c_cls + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: ``pred_logits (N, Q, C)`` and ``pred_boxes (N, Q, 4)``.
            targets: per image ``labels (K,)`` and ``boxes (K, 4)`` normalised cxcywh.

        Returns:
            per image (query indices, target indices), int64 tensors of equal length min(Q, K).
        """
        result = []
        for logits, boxes, t in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
            if len(t["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                result.append((empty, empty))
                continue
            cost = self.cost_matrix(logits.float(), boxes.float(), t["labels"], t["boxes"].float())
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            result.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return result
