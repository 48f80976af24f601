"""MedMask additions to Deformable DETR: feature MAE, expert contrastive distillation, teacher tools.

* :class:`FeatureMAE` masks multi-scale encoder input tokens (probability 0.8 on all levels) through
  the padding mask, and a light deformable decoder reconstructs the backbone's coarsest map
  (detached) from the encoder memory; MSE on the masked, non-padding positions.
* :class:`ExpertDistiller` maps the last decoder layer's queries and a VFM embedding per image to a
  shared space with TRAINED projection heads (the public reference rebuilds them at random on every
  call) and applies InfoNCE (same image positive, the batch's other images negative) or the margin
  form. :class:`EmbeddingStore` reads ``<image stem>_embedding.npy`` files.
* Teacher tools for the MRT-style teaching stage: :func:`ema_update`, :func:`pseudo_labels`,
  :func:`reset_non_decoder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from medssl.detection.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh
from medssl.detection.transformer import DeformableDecoderLayer, encoder_reference_points

__all__ = ["EmbeddingStore", "ExpertDistiller", "FeatureMAE", "ema_update", "pseudo_labels",
           "random_token_masks", "reset_non_decoder"]


def random_token_masks(pad_masks: list[torch.Tensor], ratio: float, generator: torch.Generator | None = None
                       ) -> list[torch.Tensor]:
    """Hide each non-padding token of every level independently with probability ``ratio``.

    Args:
        pad_masks: per level ``(N, h, w)`` bool, True on padding.
        ratio: masking probability in [0, 1).

    Returns:
        per level ``(N, h, w)`` bool, True where the token is hidden.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    out = []
    for m in pad_masks:
        u = torch.rand(m.shape, generator=generator).to(m.device)
        out.append((u < ratio) & ~m)
    return out


class FeatureMAE(nn.Module):
    """Reconstruct the backbone's coarsest feature map from the (masked) encoder memory.

    Queries are the coarsest backbone level's tokens: the encoder memory where visible, a learned mask
    token where hidden, plus their position embedding; ``num_layers`` deformable decoder layers attend
    to the memory of all levels (hidden tokens excluded through the padding mask) and a linear head
    predicts the backbone channels.

    Args:
        d_model: transformer width.
        target_channels: channels of the backbone's coarsest map (C5).
        level: index of the projected level that comes from that map.
        n_levels, n_heads, n_points: deformable attention layout (as the detector's).
        num_layers: decoder layers (2 in MedMask).
        dim_feedforward: FFN width.
        mask_ratio: token masking probability (0.8 in MedMask).
    """

    def __init__(self, d_model: int, target_channels: int, level: int, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, num_layers: int = 2, dim_feedforward: int = 1024, mask_ratio: float = 0.8,
                 attn_impl: str = "auto") -> None:
        super().__init__()
        if not 0 <= level < n_levels:
            raise ValueError(f"level must be in [0, {n_levels}), got {level}")
        self.level, self.mask_ratio = level, mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(d_model))
        nn.init.normal_(self.mask_token, std=0.02)
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(d_model, dim_feedforward, 0.0, n_levels, n_heads, n_points, attn_impl)
            for _ in range(num_layers))
        self.head = nn.Linear(d_model, target_channels)

    def masks(self, pad_masks: list[torch.Tensor], generator: torch.Generator | None = None
              ) -> list[torch.Tensor]:
        """Random token masks for the detector's levels (see :func:`random_token_masks`)."""
        return random_token_masks(pad_masks, self.mask_ratio, generator)

    def forward(self, features: dict[str, Any], token_masks: list[torch.Tensor]) -> torch.Tensor:
        """MSE between the reconstruction and the detached coarsest backbone map on hidden tokens.

        Args:
            features: ``out["features"]`` of a detector run with ``token_masks``.
            token_masks: the per-level masks used for that run.
        """
        memory, shapes, mask = features["memory"], features["shapes"], features["mask"]  # [N, S, C], [L, 2]
        ratios = features["ratios"]  # [N, L, 2]
        target = features["backbone"][-1].detach()  # [N, Ct, h, w]
        lvl = self.level
        h, w = shapes[lvl].tolist()
        if tuple(target.shape[-2:]) != (h, w):
            raise ValueError(f"level {lvl} is {h}x{w} but the backbone's coarsest map is "
                             f"{tuple(target.shape[-2:])}: set `level` to the projection of that map")
        start = int((shapes[:lvl, 0] * shapes[:lvl, 1]).sum())
        hidden = token_masks[lvl].flatten(1)  # [N, h*w]
        tokens = memory[:, start:start + h * w]  # [N, h*w, C]
        tgt = torch.where(hidden[..., None], self.mask_token.to(tokens.dtype), tokens)
        query_pos = features["pos"][lvl].flatten(2).transpose(1, 2)  # [N, h*w, C]
        ref = encoder_reference_points(shapes[lvl:lvl + 1], ratios[:, lvl:lvl + 1])[:, :, 0]  # [N, h*w, 2]
        ref = ref[:, :, None] * ratios[:, None]  # [N, h*w, L, 2]
        for layer in self.layers:
            tgt = layer(tgt, query_pos, ref, memory, shapes, mask)
        pred = self.head(tgt)  # [N, h*w, Ct]
        tgt_tokens = target.flatten(2).transpose(1, 2)  # [N, h*w, Ct]
        weight = hidden.to(pred.dtype)  # hidden tokens are never padding (random_token_masks)
        per_token = ((pred - tgt_tokens) ** 2).mean(-1)  # [N, h*w]
        return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


class EmbeddingStore:
    """Per-image expert embeddings ``<stem>_embedding.npy`` from a folder.

    Args:
        folder: where the files are.
        skip_missing: if True a missing file gives ``None`` (counted in ``missing``); else an error.
    """

    def __init__(self, folder: str | Path, skip_missing: bool = False) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"embeddings folder not found: {self.folder} (write it with "
                                    "python -m data_tools.extract_embeddings --model SOURCE --images DIR --out DIR)")
        self.skip_missing = skip_missing
        self.missing = 0
        self.dim: int | None = None

    def load(self, image_path: str | Path) -> torch.Tensor | None:
        """``(Q, D)`` float32 tensor for the image (a ``(D,)`` file becomes ``(1, D)``), or None."""
        f = self.folder / f"{Path(image_path).stem}_embedding.npy"
        if not f.is_file():
            if self.skip_missing:
                self.missing += 1
                return None
            raise FileNotFoundError(f"expert embedding file not found: {f} (for image {image_path}); "
                                    "extract it with data_tools.extract_embeddings or enable skip_missing")
        arr = np.load(f, allow_pickle=False)
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{f}: expected a float (Q, D) or (D,) array, got {arr.dtype} {arr.shape}")
        t = torch.from_numpy(np.asarray(arr, dtype=np.float32)).reshape(-1, arr.shape[-1])  # [Q, D]
        if self.dim is None:
            self.dim = t.shape[-1]
        elif t.shape[-1] != self.dim:
            raise ValueError(f"{f}: embedding width {t.shape[-1]} differs from the others ({self.dim})")
        return t


class _Proj(nn.Sequential):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class ExpertDistiller(nn.Module):
    """Contrastive distillation from VFM embeddings into the detector's decoder queries.

    Both sides are mean-pooled over their queries/rows, projected by trained 2-layer heads to
    ``proj_dim`` and L2-normalised.

    Args:
        d_model: detector query width.
        expert_dim: VFM embedding width (512 for BiomedParse).
        proj_dim: shared space width.
        temperature: InfoNCE temperature.
        mode: ``"infonce"`` (symmetric cross-entropy over the batch) or ``"margin"`` (hinge:
            ``relu(margin - sim(i, i) + sim(i, j))`` averaged over the pairs i != j).
        margin: hinge margin.
    """

    def __init__(self, d_model: int, expert_dim: int, proj_dim: int = 128, temperature: float = 0.1,
                 mode: str = "infonce", margin: float = 0.2) -> None:
        super().__init__()
        if mode not in ("infonce", "margin"):
            raise ValueError(f"distillation mode must be 'infonce' or 'margin', got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.student = _Proj(d_model, proj_dim)
        self.expert = _Proj(expert_dim, proj_dim)
        self.temperature, self.mode, self.margin = temperature, mode, margin

    def forward(self, queries: torch.Tensor, embeddings: list[torch.Tensor | None]) -> torch.Tensor:
        """Contrastive loss over the images that have an embedding (0 if fewer than two).

        Args:
            queries: ``(N, Q, C)`` last decoder layer's queries.
            embeddings: per image ``(Qe, De)`` tensor or None (skipped).
        """
        keep = [i for i, e in enumerate(embeddings) if e is not None]
        if len(keep) < 2:  # no negatives: the term is undefined, contributes nothing
            return queries.sum() * 0.0
        s = F.normalize(self.student(queries[keep].mean(1)), dim=-1)  # [B, P]
        e = torch.stack([embeddings[i].to(queries).mean(0) for i in keep])  # [B, De]
        e = F.normalize(self.expert(e), dim=-1)  # [B, P]
        sim = s @ e.T  # [B, B], positives on the diagonal
        if self.mode == "infonce":
            labels = torch.arange(len(keep), device=sim.device)
            logits = sim / self.temperature
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        pos = sim.diag()[:, None]  # [B, 1]
        off = ~torch.eye(len(keep), dtype=torch.bool, device=sim.device)
        return F.relu(self.margin - pos + sim)[off].mean()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, shadow: list[torch.Tensor] | None = None
               ) -> None:
    """``teacher = alpha * teacher + (1 - alpha) * student`` for parameters; buffers are copied.

    ``shadow``: float32 copies of the teacher's parameters, for a teacher held in bf16 / fp16 (DeepSpeed bf16):
    the average is kept in them and the teacher gets its rounded value. Without them a bf16 teacher would
    hardly move, as ``(1 - alpha)`` x the difference (4e-4 of it at 0.9996) is below bf16's resolution.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}")
    params = list(zip(teacher.parameters(), student.parameters()))
    if shadow is not None and len(shadow) != len(params):
        raise ValueError(f"shadow holds {len(shadow)} tensors for {len(params)} teacher parameters")
    for i, (t, s) in enumerate(params):
        if shadow is None:
            t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)
        else:
            shadow[i].mul_(alpha).add_(s.detach().float(), alpha=1 - alpha)
            t.copy_(shadow[i])
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


@torch.no_grad()
def pseudo_labels(outputs: dict[str, Any], threshold: float, nms_iou: float = 0.7) -> list[dict[str, torch.Tensor]]:
    """Teacher predictions -> targets: sigmoid score above ``threshold``, class-agnostic NMS.

    Args:
        outputs: teacher output (``pred_logits (N, Q, K)``, ``pred_boxes (N, Q, 4)`` cxcywh normalised).
        threshold: minimum score (max over classes).
        nms_iou: NMS IoU threshold (0.7 in MRT).

    Returns:
        per image ``labels (k,)``, ``boxes (k, 4)`` normalised cxcywh, ``scores (k,)``.
    """
    result = []
    for logits, boxes in zip(outputs["pred_logits"], outputs["pred_boxes"]):
        scores, labels = logits.sigmoid().max(-1)  # [Q]
        keep = scores > threshold
        xyxy = cxcywh_to_xyxy(boxes[keep])  # [k, 4]
        idx = nms(xyxy.float(), scores[keep].float(), nms_iou)
        result.append({"labels": labels[keep][idx], "boxes": xyxy_to_cxcywh(xyxy[idx]), "scores": scores[keep][idx]})
    return result


def non_decoder_names(model: nn.Module) -> list[str]:
    """Parameter names outside the decoder and the prediction heads (backbone, projections, encoder)."""
    skip = ("transformer.decoder.", "class_embed.", "bbox_embed.", "query_embed.",
            "transformer.reference_points.", "transformer.enc_output", "transformer.pos_trans")
    return [n for n, _ in model.named_parameters() if not n.startswith(skip)]


@torch.no_grad()
def reset_non_decoder(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> int:
    """Selective retraining: put the non-decoder parameters back to ``snapshot``; returns how many."""
    params = dict(model.named_parameters())
    names = [n for n in non_decoder_names(model) if n in snapshot]
    for n in names:
        params[n].copy_(snapshot[n])
    return len(names)
