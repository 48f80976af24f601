"""Deformable DETR: backbone -> projected multi-scale maps -> deformable transformer -> shared heads."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medssl.detection.backbone import build_backbone
from medssl.detection.box_ops import cxcywh_to_xyxy, inverse_sigmoid
from medssl.detection.medmask import random_token_masks
from medssl.detection.transformer import DeformableTransformer, PositionEmbeddingSine

__all__ = ["DeformableDETR", "DetrConfig", "build_detector", "demo_detector_config", "postprocess"]


@dataclass
class DetrConfig:
    """Detector hyper-parameters; defaults are the reference Deformable DETR (ResNet-50, 256 wide)."""

    num_classes: int = 1
    in_chans: int = 1
    backbone: str = "resnet"  # "resnet" or "vit"
    backbone_name: str | None = None  # timm ResNet name, or a medssl.load_backbone source for "vit"
    backbone_weights: str | None = None  # ResNet: local weights file, or a medssl CNN backbone folder (SparK)
    backbone_freeze: bool | None = None  # ResNet: frozen BN + stem + layer1 (None: iff weights); ViT: all of it
    backbone_arch: dict | None = None  # ViT architecture record (filled from backbone_name when the model is built)
    img_size: int = 224  # nominal ViT size
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_queries: int = 300
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    attn_impl: str = "auto"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetrConfig:
        """Build from a mapping, rejecting unknown keys with a clear error."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown detector config keys {bad}; known: {sorted(known)}")
        return cls(**d)


def demo_detector_config(**overrides: Any) -> DetrConfig:
    """A small detector for CPU runs: ResNet-18, 64 wide, 2+2 layers, 50 queries."""
    base = dict(backbone="resnet", backbone_name="resnet18", hidden_dim=64, nheads=4, enc_layers=2,
                dec_layers=2, dim_feedforward=128, num_queries=50, dropout=0.0)
    return DetrConfig(**{**base, **overrides})


class _MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.layers):
            x = lin(x) if i == len(self.layers) - 1 else F.relu(lin(x))
        return x


class DeformableDETR(nn.Module):
    """Deformable DETR detector.

    ``forward(images, mask)`` returns ``pred_logits (N, Q, K)``, ``pred_boxes (N, Q, 4)`` normalised
    cxcywh (relative to each image's unpadded size), ``aux_outputs`` (one dict per earlier decoder
    layer), ``hs`` (last decoder layer's queries, ``(N, Q, C)``), ``enc_outputs`` (two-stage) and
    ``features`` (the transformer's intermediate tensors, used by MedMask).

    Args:
        cfg: :class:`DetrConfig`.
    """

    def __init__(self, cfg: DetrConfig) -> None:
        super().__init__()
        if cfg.hidden_dim % 32 != 0:
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm(32)), got {cfg.hidden_dim}")
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, in_chans=cfg.in_chans, name=cfg.backbone_name,
                                       weights=cfg.backbone_weights, img_size=cfg.img_size,
                                       freeze=cfg.backbone_freeze, record=cfg.backbone_arch)
        if cfg.backbone == "vit":  # the config alone now rebuilds this model, wherever the source went
            cfg.backbone_arch = self.backbone.record
        chans = self.backbone.num_channels
        if cfg.num_feature_levels < len(chans):
            raise ValueError(f"num_feature_levels ({cfg.num_feature_levels}) < backbone levels ({len(chans)})")
        d = cfg.hidden_dim
        self.transformer = DeformableTransformer(
            d, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.dropout,
            cfg.num_feature_levels, cfg.enc_n_points, cfg.dec_n_points, cfg.two_stage, cfg.num_queries,
            cfg.attn_impl)
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in chans]
        in_c = chans[-1]
        for _ in range(cfg.num_feature_levels - len(chans)):  # extra levels: stride-2 3x3 convs
            proj.append(nn.Sequential(nn.Conv2d(in_c, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_c = d
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)
        self.position = PositionEmbeddingSine(d // 2)
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)
        class_embed = nn.Linear(d, cfg.num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        bbox_embed = _MLP(d, d, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        num_pred = cfg.dec_layers + (1 if cfg.two_stage else 0)
        if cfg.with_box_refine:  # one head per layer, the decoder refines boxes with them
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:  # shared heads across decoder layers
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if cfg.two_stage:
            self.transformer.enc_class_embed = self.class_embed[-1]
            self.transformer.enc_bbox_embed = self.bbox_embed[-1]
            for box in self.bbox_embed:
                nn.init.constant_(box.layers[-1].bias[2:], 0.0)

    def load_pretrained(self) -> str | None:
        """The explicit init step: load the configured pretrained backbone weights (ResNet ``backbone_weights``,
        or the ViT source ``backbone_name``). Call it once before training from scratch; a checkpoint of this
        detector holds every weight, so rebuilding from one never calls this. Returns what was loaded."""
        c = self.cfg
        if c.backbone == "resnet" and c.backbone_weights:
            self.backbone.load_pretrained(c.backbone_weights)
            return str(c.backbone_weights)
        if c.backbone == "vit" and c.backbone_name:
            self.backbone.load_pretrained(c.backbone_name)
            return str(c.backbone_name)
        return None

    def multiscale(self, images: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Backbone maps, projected levels, their padding masks and position embeddings.

        Returns:
            (backbone maps, srcs ``L x (N, C, h, w)``, masks ``L x (N, h, w)``, pos ``L x (N, C, h, w)``).
        """
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        feats = self.backbone(images)  # list of [N, C_l, h_l, w_l]
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for i in range(len(feats), len(self.input_proj)):
            srcs.append(self.input_proj[i](feats[-1] if i == len(feats) else srcs[-1]))
        masks = [F.interpolate(mask[None].float(), size=s.shape[-2:])[0].bool() for s in srcs]
        pos = [self.position(m).to(s.dtype) for s, m in zip(srcs, masks)]
        return feats, srcs, masks, pos

    def head(self, t: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Class logits and boxes for every decoder layer from the transformer's output dict."""
        logits, boxes = [], []
        for lvl in range(t["hs"].shape[0]):
            hs, ref = t["hs"][lvl], inverse_sigmoid(t["references"][lvl])  # [N, Q, C], [N, Q, 2|4]
            delta = self.bbox_embed[lvl](hs)  # [N, Q, 4]
            if ref.shape[-1] == 4:
                delta = delta + ref
            else:
                delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs))
            boxes.append(delta.sigmoid())
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs": t["hs"][-1]}
        if self.cfg.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if "enc_logits" in t:
            out["enc_outputs"] = {"pred_logits": t["enc_logits"], "pred_boxes": t["enc_boxes_unact"].sigmoid()}
        return out

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                token_masks: list[torch.Tensor] | None = None, mask_ratio: float = 0.0) -> dict[str, Any]:
        """Detect.

        Args:
            images: ``(N, C, H, W)`` normalised, zero padded.
            mask: ``(N, H, W)`` bool, True on padding.
            token_masks: optional per-level ``(N, h_l, w_l)`` bool, True for tokens to hide (feature
                MAE): their features are zeroed and they join the padding mask. (Zeroing matters: the
                encoder's residual path would otherwise carry a hidden token's own feature.)
            mask_ratio: if > 0 and ``token_masks`` is None, hide each non-padding token of every level
                with this probability; the masks used are returned in ``features["token_masks"]``.
        """
        feats, srcs, masks, pos = self.multiscale(images, mask)
        if token_masks is None and mask_ratio > 0:
            token_masks = random_token_masks(masks, mask_ratio)
        if token_masks is not None:
            srcs = [s.masked_fill(tm[:, None], 0.0) for s, tm in zip(srcs, token_masks)]
        query = None if self.cfg.two_stage else self.query_embed.weight
        t = self.transformer(srcs, masks, pos, query, hidden=token_masks)
        out = self.head(t)
        out["features"] = {"backbone": feats, "pad_masks": masks, "pos": pos, "token_masks": token_masks, **t}
        return out


def build_detector(cfg: DetrConfig | dict[str, Any]) -> DeformableDETR:
    """Build a :class:`DeformableDETR` from a config object or dict."""
    if isinstance(cfg, dict):
        cfg = DetrConfig.from_dict(cfg)
    return DeformableDETR(cfg)


@torch.no_grad()
def postprocess(outputs: dict[str, Any], sizes: torch.Tensor, top_k: int = 100) -> list[dict[str, torch.Tensor]]:
    """Top-k (query, class) pairs per image as pixel xyxy boxes.

    Args:
        outputs: detector output with ``pred_logits (N, Q, K)`` and ``pred_boxes (N, Q, 4)``.
        sizes: ``(N, 2)`` (h, w) of each image in pixels (the size the boxes are reported in).
        top_k: detections per image.

    Returns:
        per image ``scores (k,)`` sigmoid, ``labels (k,)``, ``boxes (k, 4)`` xyxy pixels.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    n, q, k = logits.shape
    prob = logits.sigmoid().flatten(1)  # [N, Q*K]
    top = min(top_k, q * k)
    scores, idx = prob.topk(top, dim=1)  # [N, top]
    labels, qidx = idx % k, idx // k
    xyxy = cxcywh_to_xyxy(boxes).gather(1, qidx[..., None].expand(-1, -1, 4))  # [N, top, 4]
    h, w = sizes.to(xyxy).unbind(-1)
    xyxy = xyxy * torch.stack([w, h, w, h], -1)[:, None]
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy)]
