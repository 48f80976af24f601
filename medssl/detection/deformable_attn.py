"""Multi-scale deformable attention (Deformable DETR), in pure PyTorch, for CPU and GPU.

Two paths compute the same function:

* ``ms_deform_attn_reference``: the published pure-PyTorch form (one ``grid_sample`` per level,
  zero padding, ``align_corners=False``); kept as the readable reference.
* ``ms_deform_attn_fused``: every level and point in one ``F.embedding_bag`` call. The 4 bilinear
  corners of each sampling point become (row index, weight) pairs into the flattened value table of
  all levels; ``embedding_bag(mode="sum", per_sample_weights=...)`` gathers and sums them without
  materialising the ``[.., corners, head_dim]`` tensor, and has fused CPU and CUDA kernels for the
  forward and backward passes. No compiled extension is needed.

``ms_deform_attn`` picks the fused path (``impl="auto"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_fused", "ms_deform_attn_reference"]


def _check_shapes(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor) -> None:
    """Raise ValueError if the four arguments do not have consistent shapes."""
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, heads, head_dim), got shape {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2), got shape {tuple(spatial_shapes.shape)}")
    n, s, m, _ = value.shape
    n_levels = spatial_shapes.shape[0]
    total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if total != s:
        raise ValueError(f"value has S={s} tokens but spatial_shapes sum to {total}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (N, Lq, heads, L, P, 2), "
                         f"got shape {tuple(sampling_locations.shape)}")
    ln, _, lm, ll, _, _ = sampling_locations.shape
    if (ln, lm, ll) != (n, m, n_levels):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match value "
                         f"(N={n}, heads={m}) and spatial_shapes (L={n_levels})")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights must be {tuple(sampling_locations.shape[:-1])}, "
                         f"got {tuple(attention_weights.shape)}")


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: torch.Tensor,
                             sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention, the per-level ``grid_sample`` reference form.

    Args:
        value: ``(N, S, heads, head_dim)`` values of all levels, flattened row-major per level.
        spatial_shapes: ``(L, 2)`` long tensor of (H, W) per level.
        sampling_locations: ``(N, Lq, heads, L, P, 2)`` normalised (x, y) in [0, 1].
        attention_weights: ``(N, Lq, heads, L, P)``.

    Returns:
        ``(N, Lq, heads * head_dim)``.
    """
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)  # L x [N, H*W, M, D]
    grids = 2 * sampling_locations - 1  # [N, Lq, M, L, P, 2]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)  # [N*M, D, H, W]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [N*M, D, Lq, P]
    attn = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)  # [N*M, 1, Lq, L*P]
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # [N*M, D, Lq]
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()  # [N, Lq, M*D]


def _corner_indices_weights(spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                            attention_weights: torch.Tensor, n_tokens: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices into the flattened value table and weights of the 4 bilinear corners.

    Returns:
        (index, weight), both ``(N, Lq, heads, L*P*4)``; index is into a ``(N*heads*S, D)`` table
        ordered (n, head, token); corners outside the map get weight 0 (zero padding) and a clamped,
        valid index.
    """
    n, _, m, n_levels, n_points, _ = sampling_locations.shape
    dev = sampling_locations.device
    shapes = spatial_shapes.to(dev)
    h_lvl = shapes[:, 0].view(-1, 1, 1)  # [L, 1, 1]
    w_lvl = shapes[:, 1].view(-1, 1, 1)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])  # [L]
    # align_corners=False: pixel centre i sits at (i + 0.5) / size
    x = sampling_locations[..., 0] * w_lvl.squeeze(-1).to(sampling_locations.dtype) - 0.5  # [N, Lq, M, L, P]
    y = sampling_locations[..., 1] * h_lvl.squeeze(-1).to(sampling_locations.dtype) - 0.5
    x0 = x.detach().floor()
    y0 = y.detach().floor()
    fx = (x - x0).unsqueeze(-1)  # gradients reach the locations through the fractions
    fy = (y - y0).unsqueeze(-1)
    step = torch.arange(2, device=dev)  # [2] the two neighbours along each axis
    xc = x0.long().unsqueeze(-1) + step  # [N, Lq, M, L, P, 2]
    yc = y0.long().unsqueeze(-1) + step
    vx = (xc >= 0) & (xc < w_lvl)  # separable validity: zero padding outside the map
    vy = (yc >= 0) & (yc < h_lvl)
    wx = torch.cat([1 - fx, fx], -1) * vx  # [N, Lq, M, L, P, 2]
    wy = torch.cat([1 - fy, fy], -1) * vy * attention_weights.unsqueeze(-1)
    weight = wy.unsqueeze(-1) * wx.unsqueeze(-2)  # [N, Lq, M, L, P, 2(y), 2(x)]
    head_base = (torch.arange(n, device=dev).view(n, 1, 1, 1, 1, 1) * m
                 + torch.arange(m, device=dev).view(1, 1, m, 1, 1, 1)) * n_tokens  # [N, 1, M, 1, 1, 1]
    rows = head_base + starts.view(-1, 1, 1) + yc.clamp(min=0).minimum(h_lvl - 1) * w_lvl  # [.., P, 2]
    index = rows.unsqueeze(-1) + xc.clamp(min=0).minimum(w_lvl - 1).unsqueeze(-2)  # [N, Lq, M, L, P, 2, 2]
    if n * m * n_tokens < 2**31:
        index = index.int()
    return index.flatten(3), weight.flatten(3)


def ms_deform_attn_fused(value: torch.Tensor, spatial_shapes: torch.Tensor,
                         sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention in one ``embedding_bag`` over all levels and points.

    Same arguments and result as :func:`ms_deform_attn_reference`.
    """
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    n, s, m, d = value.shape
    lq = sampling_locations.shape[1]
    index, weight = _corner_indices_weights(spatial_shapes, sampling_locations, attention_weights, s)
    table = value.transpose(1, 2).reshape(n * m * s, d)  # [N*M*S, D]
    k = index.shape[-1]
    out = F.embedding_bag(index.reshape(-1, k), table, mode="sum",
                          per_sample_weights=weight.reshape(-1, k).to(table.dtype))  # [N*Lq*M, D]
    return out.view(n, lq, m * d)  # [N, Lq, M*D]


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: ``(N, S, heads, head_dim)``.
        spatial_shapes: ``(L, 2)`` long tensor of (H, W).
        sampling_locations: ``(N, Lq, heads, L, P, 2)`` in [0, 1] (x, y).
        attention_weights: ``(N, Lq, heads, L, P)``.
        impl: ``"auto"``/``"fused"`` (one embedding_bag) or ``"reference"`` (per-level grid_sample).

    Returns:
        ``(N, Lq, heads * head_dim)``.

    Example:
        >>> v = torch.randn(1, 20, 2, 4); shapes = torch.tensor([[4, 4], [2, 2]])
        >>> loc = torch.rand(1, 3, 2, 2, 4, 2); w = torch.rand(1, 3, 2, 2, 4)
        >>> ms_deform_attn(v, shapes, loc, w).shape
        torch.Size([1, 3, 8])
    """
    if impl in ("auto", "fused"):
        return ms_deform_attn_fused(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    raise ValueError(f"impl must be 'auto', 'fused' or 'reference', got {impl!r}")


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module with the reference initialisation.

    Args:
        d_model: hidden size.
        n_levels: number of feature levels.
        n_heads: attention heads (``d_model`` must be divisible by it).
        n_points: sampling points per head and level.
        impl: kernel choice passed to :func:`ms_deform_attn`.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 impl: str = "auto") -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if impl not in ("auto", "fused", "reference"):
            raise ValueError(f"impl must be 'auto', 'fused' or 'reference', got {impl!r}")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.impl = (
            d_model, n_levels, n_heads, n_points, impl)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a directional grid (head h points at angle 2*pi*h/heads, point i at
        distance i+1), attention weights at zero (uniform), value/output projections xavier."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [M, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)  # [M, L, P, 2]
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from queries to the multi-scale input.

        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` normalised (x, y), or ``(N, Lq, L, 4)`` boxes
                (cx, cy, w, h) whose size scales the offsets.
            input_flatten: ``(N, S, C)`` all levels flattened.
            spatial_shapes: ``(L, 2)`` (H, W).
            padding_mask: ``(N, S)`` bool, True where the input is padding (its value is zeroed).

        Returns:
            ``(N, Lq, C)``.
        """
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        m, ll, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)  # [N, S, C]
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)  # [N, S, M, D]
        offsets = self.sampling_offsets(query).view(n, lq, m, ll, p, 2)  # [N, Lq, M, L, P, 2]
        attn = self.attention_weights(query).view(n, lq, m, ll * p).softmax(-1).view(n, lq, m, ll, p)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(offsets)  # [L, 2]
            loc = (reference_points[:, :, None, :, None, :]
                   + offsets / normalizer[None, None, None, :, None, :])  # [N, Lq, M, L, P, 2]
        elif reference_points.shape[-1] == 4:
            loc = (reference_points[:, :, None, :, None, :2]
                   + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
        out = ms_deform_attn(value, spatial_shapes, loc, attn, impl=self.impl)  # [N, Lq, C]
        return self.output_proj(out)
