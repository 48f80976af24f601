"""Deformable DETR encoder-decoder transformer (multi-scale deformable attention), with two-stage option."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medssl.detection.box_ops import inverse_sigmoid
from medssl.detection.deformable_attn import MSDeformAttn

__all__ = ["DeformableTransformer", "DeformableDecoder", "DeformableDecoderLayer", "PositionEmbeddingSine",
           "encoder_reference_points", "flatten_levels", "valid_ratios"]


class PositionEmbeddingSine(nn.Module):
    """2-D sine position embedding from the padding mask (normalised to 2*pi, half the dims per axis)."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask (N, H, W)`` True on padding -> ``(N, 2*num_pos_feats, H, W)``."""
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)  # [N, H, W]
        x = not_mask.cumsum(2)
        eps, scale = 1e-6, 2 * math.pi
        y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
        x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)  # [F]
        px = x[..., None] / dim_t  # [N, H, W, F]
        py = y[..., None] / dim_t
        px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], -1).flatten(3)
        py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], -1).flatten(3)
        return torch.cat([py, px], -1).permute(0, 3, 1, 2)  # [N, 2F, H, W]


def valid_ratios(masks: list[torch.Tensor]) -> torch.Tensor:
    """Fraction of each level that is image, not padding: ``(N, L, 2)`` as (w_ratio, h_ratio)."""
    out = []
    for m in masks:  # [N, H, W]
        h, w = m.shape[-2:]
        vh = (~m[:, :, 0]).sum(1).float() / h
        vw = (~m[:, 0, :]).sum(1).float() / w
        out.append(torch.stack([vw, vh], -1))
    return torch.stack(out, 1)


def flatten_levels(srcs: list[torch.Tensor], masks: list[torch.Tensor], pos: list[torch.Tensor],
                   level_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten per-level maps to tokens.

    Returns:
        src ``(N, S, C)``, mask ``(N, S)``, pos ``(N, S, C)`` (+ level embedding), shapes ``(L, 2)``.
    """
    dev = srcs[0].device  # scalar_tensor per size, so that a graph export computes the shapes from its input
    shapes = torch.stack([torch.stack([torch.scalar_tensor(d, dtype=torch.long, device=dev) for d in s.shape[-2:]])
                          for s in srcs])  # [L, 2]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [N, S, C]
    mask = torch.cat([m.flatten(1) for m in masks], 1)  # [N, S]
    pos_f = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[i] for i, p in enumerate(pos)], 1)
    return src, mask, pos_f, shapes


def encoder_reference_points(spatial_shapes: torch.Tensor | Sequence[tuple[int, int]], ratios: torch.Tensor
                             ) -> torch.Tensor:
    """Pixel centres of every token, normalised by the valid area: ``(N, S, L, 2)``.

    ``spatial_shapes``: ``(L, 2)`` tensor or a list of (h, w) sizes (the list form keeps the sizes out of
    tensor data, so that a graph export sees them as shapes).
    """
    refs = []
    dev = ratios.device
    sizes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
    for lvl, (h, w) in enumerate(sizes):
        # pixel centres 0.5, 1.5, ... (arange, unlike linspace, keeps a symbolic size symbolic in a graph export)
        ry, rx = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=dev, dtype=torch.float32) + 0.5, indexing="ij")
        ry = ry.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)  # [N, h*w]
        rx = rx.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack([rx, ry], -1))
    ref = torch.cat(refs, 1)  # [N, S, 2]
    return ref[:, :, None] * ratios[:, None]  # [N, S, L, 2]


class _FFN(nn.Module):
    def __init__(self, d: int, d_ffn: int, dropout: float) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(d, d_ffn), nn.Linear(d_ffn, d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop2(self.lin2(self.drop1(F.relu(self.lin1(x))))))


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels' tokens + FFN (post-norm)."""

    def __init__(self, d: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 impl: str) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d, n_levels, n_heads, n_points, impl)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)
        self.ffn = _FFN(d, d_ffn, dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor, shapes: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """``src, pos (N, S, C)``, ``ref (N, S, L, 2)`` -> ``(N, S, C)``."""
        src = self.norm(src + self.drop(self.self_attn(src + pos, ref, src, shapes, mask)))
        return self.ffn(src)


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention to the memory, FFN (post-norm)."""

    def __init__(self, d: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 impl: str) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.drop1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d)
        self.cross_attn = MSDeformAttn(d, n_levels, n_heads, n_points, impl)
        self.drop2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d)
        self.ffn = _FFN(d, d_ffn, dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, ref: torch.Tensor, memory: torch.Tensor,
                shapes: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        """``tgt, query_pos (N, Q, C)``, ``ref (N, Q, L, 2|4)``, ``memory (N, S, C)`` -> ``(N, Q, C)``."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt = self.norm2(tgt + self.drop2(self.cross_attn(tgt + query_pos, ref, memory, shapes, memory_mask)))
        return self.ffn(tgt)


class DeformableDecoder(nn.Module):
    """Stack of decoder layers; with ``bbox_embed`` set (box refinement) each layer refines the boxes."""

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.bbox_embed: nn.ModuleList | None = None

    def forward(self, tgt: torch.Tensor, ref: torch.Tensor, memory: torch.Tensor, shapes: torch.Tensor,
                ratios: torch.Tensor, query_pos: torch.Tensor, memory_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns hidden states ``(layers, N, Q, C)`` and the reference points each layer used
        (list of ``(N, Q, 2|4)``: 2-d points become 4-d boxes once refined)."""
        hs, refs = [], []
        out = tgt
        for lid, layer in enumerate(self.layers):
            scale = torch.cat([ratios, ratios], -1) if ref.shape[-1] == 4 else ratios  # [N, L, 2|4]
            out = layer(out, query_pos, ref[:, :, None] * scale[:, None], memory, shapes, memory_mask)
            refs.append(ref)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](out)  # [N, Q, 4]
                if ref.shape[-1] == 4:
                    new = (delta + inverse_sigmoid(ref)).sigmoid()
                else:
                    new = torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], -1).sigmoid()
                ref = new.detach()
            hs.append(out)
        return torch.stack(hs), refs


def proposal_pos_embed(proposals: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0
                       ) -> torch.Tensor:
    """Sine embedding of logit-space boxes ``(N, Q, 4)`` -> ``(N, Q, 4*num_pos_feats)``."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = proposals.float().sigmoid()[..., None] * (2 * math.pi) / dim_t  # [N, Q, 4, F]
    return torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], -1).flatten(2).to(proposals.dtype)


class DeformableTransformer(nn.Module):
    """Deformable DETR transformer.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: sizes.
        num_feature_levels, enc_n_points, dec_n_points: deformable attention layout.
        two_stage: queries from the top-scoring encoder proposals instead of learned embeddings.
        two_stage_num_proposals: how many proposals become queries.
        attn_impl: deformable attention kernel (``"auto"``, ``"fused"``, ``"reference"``).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 two_stage: bool = False, two_stage_num_proposals: int = 300, attn_impl: str = "auto") -> None:
        super().__init__()
        self.d_model, self.two_stage, self.num_proposals = d_model, two_stage, two_stage_num_proposals
        enc = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                     enc_n_points, attn_impl)
        self.encoder = nn.ModuleList([copy.deepcopy(enc) for _ in range(num_encoder_layers)])
        dec = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                     dec_n_points, attn_impl)
        self.decoder = DeformableDecoder(dec, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        # set by the detector in two-stage mode: heads applied to the encoder output
        self.enc_class_embed: nn.Module | None = None
        self.enc_bbox_embed: nn.Module | None = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1 and "sampling_offsets" not in name and "attention_weights" not in name \
                    and "value_proj" not in name and "output_proj" not in name:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def encode(self, src: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, shapes: torch.Tensor,
               ratios: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Run the encoder on flattened tokens ``(N, S, C)`` -> memory ``(N, S, C)``; ``sizes``: the levels'
        (h, w) as ints (default: read from ``shapes``)."""
        ref = encoder_reference_points(shapes if sizes is None else sizes, ratios)  # [N, S, L, 2]
        for layer in self.encoder:
            src = layer(src, pos, ref, shapes, mask)
        return src

    def _proposals(self, memory: torch.Tensor, mask: torch.Tensor, shapes: torch.Tensor,
                   sizes: Sequence[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder-output proposals: one box per token (level-dependent size) in logit space."""
        n = memory.shape[0]
        props, start = [], 0
        for lvl, (h, w) in enumerate(shapes.tolist() if sizes is None else sizes):
            m = mask[:, start:start + h * w].view(n, h, w)
            vh, vw = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)  # [N]
            gy, gx = torch.meshgrid(torch.arange(h, device=memory.device, dtype=memory.dtype),
                                    torch.arange(w, device=memory.device, dtype=memory.dtype), indexing="ij")
            grid = torch.stack([gx, gy], -1)[None]  # [1, h, w, 2]
            scale = torch.stack([vw, vh], -1).to(memory.dtype).clamp(min=1).view(n, 1, 1, 2)
            grid = (grid + 0.5) / scale  # [N, h, w, 2]
            wh = torch.full_like(grid, 0.05 * 2.0**lvl)
            props.append(torch.cat([grid, wh], -1).view(n, -1, 4))
            start += h * w
        props = torch.cat(props, 1)  # [N, S, 4]
        valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True) & ~mask[..., None]
        props = inverse_sigmoid(props).masked_fill(~valid, 1e4)  # large logit: effectively off-image
        out_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid, 0.0)))
        return out_memory, props

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos: list[torch.Tensor],
                query_embed: torch.Tensor | None = None, hidden: list[torch.Tensor] | None = None
                ) -> dict[str, Any]:
        """Encode the multi-scale maps and decode the queries.

        Args:
            srcs, masks, pos: per level ``(N, C, H, W)``, ``(N, H, W)`` (True = padding/masked),
                ``(N, C, H, W)``.
            query_embed: ``(Q, 2C)`` learned query position + content (not used in two-stage mode).
            hidden: optional per-level ``(N, H, W)`` masks of tokens hidden from attention (feature MAE);
                they join the attention mask but not the valid ratios, which describe the padding only.

        Returns:
            dict with ``hs (layers, N, Q, C)``, ``init_reference (N, Q, 2|4)``, ``references``
            (list per layer of ``(N, Q, 2|4)``), ``memory (N, S, C)``, ``mask (N, S)``, ``shapes (L, 2)``,
            ``ratios (N, L, 2)`` and, two-stage, ``enc_logits``/``enc_boxes_unact``.
        """
        ratios = valid_ratios(masks)  # [N, L, 2]
        if hidden is not None:
            masks = [m | h for m, h in zip(masks, hidden)]
        src, mask, pos_f, shapes = flatten_levels(srcs, masks, pos, self.level_embed)
        sizes = [tuple(s.shape[-2:]) for s in srcs]  # the levels' (h, w) as ints, not tensor data
        memory = self.encode(src, mask, pos_f, shapes, ratios, sizes)  # [N, S, C]
        n, _, c = memory.shape
        out: dict[str, Any] = {}
        if self.two_stage:
            out_memory, props = self._proposals(memory, mask, shapes, sizes)
            enc_logits = self.enc_class_embed(out_memory)  # [N, S, K]
            enc_unact = self.enc_bbox_embed(out_memory) + props  # [N, S, 4]
            k = min(self.num_proposals, enc_logits.shape[1])
            top = enc_logits[..., 0].topk(k, dim=1)[1]  # [N, k]
            ref_unact = enc_unact.gather(1, top[..., None].expand(-1, -1, 4)).detach()  # [N, k, 4]
            ref = ref_unact.sigmoid()
            qp = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(ref_unact, c // 2)))  # [N, k, 2C]
            query_pos, tgt = qp.split(c, dim=-1)
            out.update(enc_logits=enc_logits, enc_boxes_unact=enc_unact)
        else:
            if query_embed is None:
                raise ValueError("query_embed (Q, 2*d_model) is required unless two_stage=True")
            query_pos, tgt = query_embed.split(c, dim=1)  # [Q, C] each
            query_pos = query_pos[None].expand(n, -1, -1)
            tgt = tgt[None].expand(n, -1, -1)
            ref = self.reference_points(query_pos).sigmoid()  # [N, Q, 2]
        hs, refs = self.decoder(tgt, ref, memory, shapes, ratios, query_pos, mask)
        out.update(hs=hs, init_reference=ref, references=refs, memory=memory, mask=mask, shapes=shapes,
                   ratios=ratios)
        return out
