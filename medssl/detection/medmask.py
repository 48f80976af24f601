"""MedMask additions to Deformable DETR: feature MAE, expert contrastive distillation, teacher tools.

* :class:`FeatureMAE` masks multi-scale encoder input tokens (probability 0.8 on all levels) through
  the padding mask, and a light deformable decoder reconstructs the backbone's coarsest map
  (detached) from the encoder memory; MSE on the masked, non-padding positions.
* :class:`ExpertDistiller` maps the last decoder layer's queries and a VFM embedding per image to a
  shared space: image level with TRAINED projection heads (InfoNCE or margin), the public reference's
  index-wise form with fixed random projections (``medmask``; the reference rebuilds them at random on
  every call), or region level through the predicted boxes (``object``). :class:`EmbeddingStore` reads
  ``<image stem>_embedding.npy`` files.
* Teacher tools for the MRT-style teaching stage: :func:`ema_update`, :func:`pseudo_labels`,
  :func:`reset_non_decoder`, and the pseudo-label score thresholds of MRT (:func:`mrt_threshold`) and
  MedMask (:func:`medmask_threshold`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from medssl.detection.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh
from medssl.detection.transformer import DeformableDecoderLayer, encoder_reference_points

__all__ = ["DISTILL_MODES", "EmbeddingStore", "ExpertDistiller", "FeatureMAE", "ema_update", "medmask_threshold",
           "mrt_threshold", "pseudo_labels", "random_token_masks", "region_embeddings", "reset_non_decoder"]


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


DISTILL_MODES = ("infonce", "margin", "medmask", "object")
MEDMASK_PROJ_DIM = 256  # the reference's projection width (Linear(256->256) and Linear(512->256))
_DEFAULT_MARGIN = {"margin": 0.2, "medmask": 1.0}


def region_embeddings(tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Expert region embeddings: the token grid averaged inside each box, weighted by the overlap area.

    Args:
        tokens: ``(g*g, D)`` expert tokens of one image, row-major over a ``g x g`` grid covering the image.
        boxes: ``(K, 4)`` xyxy boxes normalised to the image (clipped to [0, 1] here).

    Returns:
        ``(K, D)``: per box, sum over cells of (cell-box overlap area) x token / the box's total overlap; a box
        that overlaps no cell gets zeros.
    """
    g = math.isqrt(tokens.shape[0])
    if g * g != tokens.shape[0]:
        raise ValueError(f"expert tokens must form a square grid, got {tokens.shape[0]} rows")
    b = boxes.clamp(0, 1).to(tokens.dtype)  # [K, 4]
    edges = torch.arange(g + 1, dtype=tokens.dtype, device=tokens.device) / g  # [g + 1]
    ox = (torch.minimum(b[:, 2:3], edges[None, 1:]) - torch.maximum(b[:, 0:1], edges[None, :-1])).clamp(min=0)
    oy = (torch.minimum(b[:, 3:4], edges[None, 1:]) - torch.maximum(b[:, 1:2], edges[None, :-1])).clamp(min=0)
    w = (oy[:, :, None] * ox[:, None, :]).flatten(1)  # [K, g*g] overlap areas, row-major like the tokens
    return (w @ tokens) / w.sum(-1, keepdim=True).clamp(min=1e-12)  # [K, D]


class ExpertDistiller(nn.Module):
    """Contrastive distillation from VFM embeddings into the detector's decoder queries.

    Modes (``distill.mode``):

    * ``infonce`` / ``margin`` (ours, image level): both sides mean-pooled over their queries / rows,
      projected by trained 2-layer heads to ``proj_dim``, L2-normalised; symmetric InfoNCE over the batch
      (same image positive), or the hinge ``relu(margin - sim(i, i) + sim(i, j))`` averaged over i != j.
    * ``medmask``: the public MedMask reference. Queries L2-normalised per query; both sides truncated to
      the shorter length n (101 for BiomedParse) and paired index-wise (query i with expert row i);
      projected by FIXED random ``Linear(C -> 256)`` and ``Linear(D -> 256)`` (never trained: the
      reference draws them afresh on every call, we draw them once); flattened to ``(B, n*256)``,
      L2-normalised; over the batch's pairwise distances d(i, j): ``d^2`` for i == j and
      ``relu(margin - d)^2`` otherwise (margin 1), averaged over all B x B terms.
    * ``object`` (ours, region level): the ``regions`` highest-scoring queries of each image are matched,
      through their predicted boxes, to expert region embeddings (the expert's token grid pooled in the
      box, :func:`region_embeddings`; the first ``grid_offset`` rows, e.g. the cls token, are skipped);
      trained heads, symmetric InfoNCE across all regions of all images of the batch. It needs an expert
      whose rows hold a token grid (``data_tools.extract_embeddings`` backbones: cls + grid x grid);
      BiomedParse's 101 object-query rows are no grid (101 - 1 = 100 would pass the shape check).

    Args:
        d_model: detector query width.
        expert_dim: VFM embedding width (512 for BiomedParse).
        proj_dim: shared space width (trained heads; ``medmask`` uses 256).
        temperature: InfoNCE temperature.
        mode: one of :data:`DISTILL_MODES`.
        margin: hinge margin (None: the mode's reference value, 0.2 for ``margin``, 1 for ``medmask``).
        regions: queries per image in ``object`` mode.
        grid_offset: leading expert rows that are not grid tokens (``object`` mode).
    """

    def __init__(self, d_model: int, expert_dim: int, proj_dim: int = 128, temperature: float = 0.1,
                 mode: str = "infonce", margin: float | None = None, regions: int = 8, grid_offset: int = 1) -> None:
        super().__init__()
        if mode not in DISTILL_MODES:
            raise ValueError(f"distillation mode must be one of {DISTILL_MODES}, got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if regions < 1 or grid_offset < 0:
            raise ValueError(f"regions must be >= 1 and grid_offset >= 0, got {regions}, {grid_offset}")
        if mode == "medmask":
            self.student = nn.Linear(d_model, MEDMASK_PROJ_DIM).requires_grad_(False)
            self.expert = nn.Linear(expert_dim, MEDMASK_PROJ_DIM).requires_grad_(False)
        else:
            self.student = _Proj(d_model, proj_dim)
            self.expert = _Proj(expert_dim, proj_dim)
        self.temperature, self.mode, self.regions, self.grid_offset = temperature, mode, regions, grid_offset
        self.margin = _DEFAULT_MARGIN.get(mode, 0.0) if margin is None else float(margin)

    def forward(self, queries: torch.Tensor, embeddings: list[torch.Tensor | None],
                boxes: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Distillation loss over the images that have an embedding (0 if the batch has no negative).

        Args:
            queries: ``(N, Q, C)`` last decoder layer's queries.
            embeddings: per image ``(Qe, De)`` tensor or None (skipped).
            boxes: ``(N, Q, 4)`` predicted boxes, xyxy normalised to the expert's view of the image (``object``).
            scores: ``(N, Q)`` query scores that pick the regions (``object``).
        """
        keep = [i for i, e in enumerate(embeddings) if e is not None]
        if self.mode == "medmask":
            return self._medmask(queries, embeddings, keep) if keep else queries.sum() * 0.0
        if self.mode == "object":
            if boxes is None or scores is None:
                raise ValueError("object distillation needs the predicted boxes and scores")
            return self._object(queries, embeddings, keep, boxes, scores)
        if len(keep) < 2:  # no negatives: the term is undefined, contributes nothing
            return queries.sum() * 0.0
        s = F.normalize(self.student(queries[keep].mean(1)), dim=-1)  # [B, P]
        e = torch.stack([embeddings[i].to(queries).mean(0) for i in keep])  # [B, De]
        e = F.normalize(self.expert(e), dim=-1)  # [B, P]
        sim = s @ e.T  # [B, B], positives on the diagonal
        if self.mode == "infonce":
            return self._infonce(sim)
        pos = sim.diag()[:, None]  # [B, 1]
        off = ~torch.eye(len(keep), dtype=torch.bool, device=sim.device)
        return F.relu(self.margin - pos + sim)[off].mean()

    def _infonce(self, sim: torch.Tensor) -> torch.Tensor:
        labels = torch.arange(len(sim), device=sim.device)
        logits = sim / self.temperature
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    def _medmask(self, queries: torch.Tensor, embeddings: list[torch.Tensor | None], keep: list[int]
                 ) -> torch.Tensor:
        n = min(queries.shape[1], *(embeddings[i].shape[0] for i in keep))
        s = F.normalize(queries[keep][:, :n], dim=-1)  # [B, n, C]
        e = torch.stack([embeddings[i][:n] for i in keep]).to(s)  # [B, n, De]
        s = F.normalize(self.student(s).flatten(1), dim=-1)  # [B, n*256]
        e = F.normalize(self.expert(e).flatten(1), dim=-1)  # [B, n*256]
        d2 = (s[:, None] - e[None]).pow(2).sum(-1)  # [B, B] squared distances, student i to expert j
        same = torch.eye(len(keep), dtype=torch.bool, device=d2.device)
        far = F.relu(self.margin - d2.clamp(min=1e-12).sqrt()) ** 2
        return torch.where(same, d2, far).mean()

    def _object(self, queries: torch.Tensor, embeddings: list[torch.Tensor | None], keep: list[int],
                boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.regions, queries.shape[1])
        if len(keep) * k < 2:
            return queries.sum() * 0.0
        idx = scores[keep].detach().topk(k, dim=-1).indices  # [B, k]
        q = torch.gather(queries[keep], 1, idx[..., None].expand(-1, -1, queries.shape[-1]))  # [B, k, C]
        b = torch.gather(boxes[keep].detach(), 1, idx[..., None].expand(-1, -1, 4))  # [B, k, 4]
        r = torch.stack([region_embeddings(embeddings[i][self.grid_offset:].to(q), b[j])
                         for j, i in enumerate(keep)])  # [B, k, De]
        s = F.normalize(self.student(q.flatten(0, 1)), dim=-1)  # [B*k, P]
        e = F.normalize(self.expert(r.flatten(0, 1)), dim=-1)  # [B*k, P]
        return self._infonce(s @ e.T)  # positives: each query with its own region


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


def mrt_threshold(threshold: float, matched_score: float, t_max: float, t_min: float = 0.25) -> float:
    """MRT's dynamic pseudo-label threshold, updated once per epoch.

    ``t <- clip(0.9 t + 0.1 * 0.5 * sqrt(s), t_min, t_max)`` with ``s`` the mean score of the student's
    predictions matched to the source labels during the epoch (MRT starts at 0.3; ``t_max`` 0.45-0.6).
    """
    if not 0.0 <= matched_score <= 1.0:
        raise ValueError(f"matched score must be in [0, 1], got {matched_score}")
    return float(min(max(0.9 * threshold + 0.1 * 0.5 * math.sqrt(matched_score), t_min), t_max))


def medmask_threshold(epoch: int, epochs: int) -> float:
    """MedMask's pseudo-label threshold schedule: ``(1 - delta) 0.1 + delta 0.8``, ``delta = 2 / (1 + exp(-epoch
    / epochs)) - 1`` (0.1 at epoch 0, rising towards 0.42 at ``epochs``)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    delta = 2.0 / (1.0 + math.exp(-epoch / epochs)) - 1.0
    return (1.0 - delta) * 0.1 + delta * 0.8
