"""Deformable DETR set loss: sigmoid focal classification + L1 + GIoU on matched boxes, aux layers too."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from medssl.detection.box_ops import cxcywh_to_xyxy, generalized_box_iou
from medssl.detection.matcher import HungarianMatcher

__all__ = ["SetCriterion"]


class SetCriterion(nn.Module):
    """Hungarian-matched detection loss, returned as a dict of WEIGHTED terms (sum them for the total).

    Keys: ``loss_ce``, ``loss_bbox``, ``loss_giou`` for the final layer, the same with suffix ``_i`` for
    auxiliary decoder layer i, and ``_enc`` for two-stage proposals.

    Args:
        num_classes: foreground classes (no background logit: sigmoid focal loss).
        matcher: defaults to ``HungarianMatcher(2, 5, 2)``.
        weight_ce, weight_bbox, weight_giou: loss weights (reference 2, 5, 2).
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None, weight_ce: float = 2.0,
                 weight_bbox: float = 5.0, weight_giou: float = 2.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def _single(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, torch.Tensor]:
        # the losses in float32 whatever the autocast dtype of the heads (bf16 targets and sums lose ~3 digits)
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()  # [N, Q, C], [N, Q, 4]
        indices = self.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(logits.device)
        src_idx = torch.cat([src for src, _ in indices]).to(logits.device)
        onehot = torch.zeros_like(logits)  # [N, Q, C]
        tgt_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        focal = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma)
        loss_ce = focal.mean(1).sum() / num_boxes * logits.shape[1]
        src_boxes = boxes[batch_idx, src_idx]  # [M, 4]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(boxes)
        loss_bbox = (src_boxes - tgt_boxes).abs().sum() / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        raw = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return {k: v * self.weights[k] for k, v in raw.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted losses of the final layer, every auxiliary layer and the two-stage encoder output.

        Args:
            outputs: ``pred_logits``, ``pred_boxes``, optional ``aux_outputs`` list and ``enc_outputs``.
            targets: per image ``labels (K,)`` int64 and ``boxes (K, 4)`` normalised cxcywh.
        """
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = self._single(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._single(aux, targets, num_boxes).items()})
        if "enc_outputs" in outputs:
            # class-agnostic proposals: every target counts as class 0
            bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update({f"{k}_enc": v for k, v in
                           self._single(outputs["enc_outputs"], bin_targets, num_boxes).items()})
        return losses
