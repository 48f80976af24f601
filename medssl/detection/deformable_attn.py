"""Multi-scale deformable attention (Deformable DETR): pure PyTorch for CPU, Triton kernels for CUDA.

Three paths compute the same function:

* ``ms_deform_attn_reference``: the published pure-PyTorch form (one ``grid_sample`` per level,
  zero padding, ``align_corners=False``); kept as the readable reference.
* ``ms_deform_attn_fused``: a custom autograd function. Forward: every level, point and bilinear corner
  in one ``F.embedding_bag`` (bag = one query and head; entries = corner rows of the value table, weighted
  by bilinear x attention weights), so the ``[.., points, head_dim]`` samples are never materialised.
  Backward: recomputes the corners, takes the per-corner dot products with the output gradient in one
  ``torch.sparse.sampled_addmm`` (attention and location gradients follow elementwise) and scatters the
  value gradient as a second ``embedding_bag`` over the corners sorted by value row. It saves only its
  inputs (about 0.14x the memory the reference saves in the encoder case) and needs no compiler.
* ``ms_deform_attn_triton`` (:mod:`medssl.detection.ms_deform_triton`): Triton forward and backward
  kernels, for CUDA tensors.
* ``ms_deform_attn_export``: the fused path's corners (the same ``_corners``) read by a plain gather and a
  weighted sum, for inference graphs (ONNX): no custom autograd Function, no ``embedding_bag``, no
  ``grid_sample`` (TensorRT has been seen to corrupt ``grid_sample``-based deformable attention). It
  materialises the ``[.., 4 * levels * points, head_dim]`` samples, so it is for export, not training.

``ms_deform_attn`` (``impl="auto"``) takes the Triton kernels for CUDA tensors when Triton imports and the
fused path otherwise (single-threaded on CPU, forward + backward, it measured faster than the per-level
``grid_sample`` form and HF's at every size from 128 to 800 px; ``benchmarks/bench_detection.py``).
The choice is logged once. ``MSDeformAttn`` runs ``ms_deform_attn_projected``: the value projection fused
into the op, its input saved instead of the value (recomputed in backward).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medssl.detection.deform_core import KernelDeformAttn as _CoreDeformAttn
from medssl.detection.deform_core import KernelPair as _Core
from medssl.detection.deform_core import level_starts

__all__ = ["IMPLS", "MSDeformAttn", "ms_deform_attn", "ms_deform_attn_export", "ms_deform_attn_fused",
           "ms_deform_attn_projected", "ms_deform_attn_reference", "level_starts", "resolve_impl", "set_attn_impl"]

IMPLS = ("auto", "fused", "reference", "triton", "export")
_log = logging.getLogger(__name__)


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


def _level_constants(spatial_shapes: torch.Tensor, n_heads: int, n_points: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (head, level, point) column: width, height and ``first token of the level * heads + head``,
    three ``(heads*L*P,)`` long tensors."""
    shapes = spatial_shapes.to(device)
    starts = level_starts(shapes)  # [L]
    head = torch.arange(n_heads, device=device).repeat_interleave(len(shapes) * n_points)  # [M*L*P]
    return (shapes[:, 1].repeat_interleave(n_points).repeat(n_heads),
            shapes[:, 0].repeat_interleave(n_points).repeat(n_heads),
            starts.repeat_interleave(n_points).repeat(n_heads) * n_heads + head)


class _Corners(NamedTuple):
    """The 4 bilinear corners of every sampling point, as ``(N*Lq, heads*L*P)`` planes.

    ``index`` is ``(N*Lq*heads, 4*L*P)``, the 4 corners (y0, x0), (y0, x1), (y1, x0), (y1, x1) of each
    level and point of one (query, head) per row (see :func:`_by_head`): rows of
    ``value.view(N*S*heads, D)``, clamped into the map where a corner lies outside it (its weight is then
    0); int32 when the table allows it. ``wx``/``wy`` are the linear weights of the low and high neighbour
    along x / y (0 outside the map); ``vx``/``vy`` (0/1) whether that neighbour is inside the map (the
    derivative of its weight with respect to the pixel coordinate is -v for the low and +v for the high one).
    """

    index: torch.Tensor
    wx: tuple[torch.Tensor, torch.Tensor]
    wy: tuple[torch.Tensor, torch.Tensor]
    vx: tuple[torch.Tensor, torch.Tensor]
    vy: tuple[torch.Tensor, torch.Tensor]


def _corners(spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor, n_tokens: int) -> _Corners:
    """Bilinear corners (zero padding, ``align_corners=False``) of ``(N, Lq, M, L, P, 2)`` locations.

    Every operation runs on contiguous ``(N*Lq, M*L*P)`` planes against ``(M*L*P,)`` column constants, so
    that the elementwise kernels get inner loops of M*L*P elements (7-D broadcasts with size-2 inner dims
    are several times slower on CPU).
    """
    n, lq, m, n_levels, n_points, _ = sampling_locations.shape
    dev, dtype = sampling_locations.device, sampling_locations.dtype
    itype = torch.int32 if n * m * n_tokens < 2**31 else torch.int64
    width, height, col_base = (t.to(itype) for t in _level_constants(spatial_shapes, m, n_points, dev))
    loc_x, loc_y = sampling_locations.reshape(n * lq, m * n_levels * n_points, 2).unbind(-1)  # [N*Lq, M*L*P]
    x = loc_x * width.to(dtype) - 0.5  # pixel coordinates: pixel centre i at i + 0.5
    y = loc_y * height.to(dtype) - 0.5
    x0f, y0f = x.floor(), y.floor()
    fx, fy = x - x0f, y - y0f
    x0, y0 = x0f.to(itype), y0f.to(itype)
    x1, y1 = x0 + 1, y0 + 1
    zero = torch.zeros((), dtype=itype, device=dev)
    vx = tuple(((c >= 0) & (c < width)).to(dtype) for c in (x0, x1))
    vy = tuple(((c >= 0) & (c < height)).to(dtype) for c in (y0, y1))
    wx = ((1 - fx) * vx[0], fx * vx[1])
    wy = ((1 - fy) * vy[0], fy * vy[1])
    # row of (n, token, head) in value.view(N*S*M, D): (n*S + token)*M + head
    row_base = (torch.arange(n, device=dev, dtype=itype) * (n_tokens * m)).view(n, 1, 1).expand(n, lq, 1)
    row_base = row_base.reshape(n * lq, 1)  # [N*Lq, 1] (a broadcast, not repeat_interleave: exports with symbolic Lq)
    cols = [c.clamp(zero, width - 1) * m for c in (x0, x1)]
    rows = [c.clamp(zero, height - 1) * (width * m) + col_base + row_base for c in (y0, y1)]
    index = _by_head([rows[0] + cols[0], rows[0] + cols[1], rows[1] + cols[0], rows[1] + cols[1]], m)
    return _Corners(index, wx, wy, vx, vy)


def _by_head(corners: list[torch.Tensor], n_heads: int) -> torch.Tensor:
    """Four ``(N*Lq, M*L*P)`` corner planes as ``(N*Lq*M, 4*L*P)``: one embedding bag per (query, head)."""
    nq = corners[0].shape[0]
    return torch.stack([c.view(nq, n_heads, -1) for c in corners], 2).view(nq * n_heads, -1)  # [N*Lq*M, 4*L*P]


def _corner_weights(c: _Corners, attn: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Bilinear x attention weight of each corner, ``(N*Lq*M, 4*L*P)`` like ``c.index``.

    ``attn``: ``(N*Lq, M*L*P)``.
    """
    wy0, wy1 = c.wy[0] * attn, c.wy[1] * attn  # [N*Lq, M*L*P]
    return _by_head([wy0 * c.wx[0], wy0 * c.wx[1], wy1 * c.wx[0], wy1 * c.wx[1]], n_heads)


def _csr(index: torch.Tensor, n_cols: int, values: torch.Tensor) -> torch.Tensor:
    """A ``(B, n_cols)`` CSR matrix with the ``K`` entries of each row of the ``(B, K)`` ``index`` at those columns."""
    n_rows, k = index.shape
    crow = torch.arange(0, n_rows * k + 1, k, device=index.device, dtype=index.dtype)  # [B + 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, index.reshape(-1), values.reshape(-1), (n_rows, n_cols))


SERIAL_BELOW = 1 << 20  # bilinear corners (N*Lq*M*L*P*4) under which the fused path runs on one CPU thread


@contextmanager
def _cpu_threads_for(tensor: torch.Tensor, n_corners: int) -> Iterator[None]:
    """One intra-op thread for small CPU problems, the configured number otherwise.

    The fused path is some 60 small operators; below ~1M corners each is too short to gain from a second
    thread (measured: no gain at 128-256 px), and on a shared machine every parallel region can wait for a
    descheduled thread (2-thread runs there were up to 10x slower than 1-thread ones at 128-192 px).
    """
    threads = torch.get_num_threads()
    if tensor.device.type != "cpu" or threads == 1 or n_corners >= SERIAL_BELOW:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fused_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Forward of the fused path: one ``embedding_bag`` whose bags are the (query, head) pairs and whose
    entries are the 4 corners of every level and point, weighted by bilinear x attention weights."""
    n, s, m, d = value.shape
    lq = sampling_locations.shape[1]
    value = value.contiguous()
    with _cpu_threads_for(value, attention_weights.numel() * 4):
        c = _corners(spatial_shapes, sampling_locations, s)
        attn = attention_weights.reshape(n * lq, -1)  # [N*Lq, M*L*P]
        out = F.embedding_bag(c.index, value.view(n * s * m, d), mode="sum",
                              per_sample_weights=_corner_weights(c, attn, m))  # [N*Lq*M, D]
    return out.view(n, lq, m * d)


def _fused_grads(needs: tuple[bool, bool, bool], grad_out: torch.Tensor, value: torch.Tensor,
                 spatial_shapes: torch.Tensor, loc: torch.Tensor, attention_weights: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for (value, locations, attention weights) where ``needs`` says so.

    The per-corner dot products ``grad_out . value`` come from one ``sparse.sampled_addmm``, the attention
    and location gradients follow elementwise; the value gradient is the transposed gather (corners sorted
    by value row, then one ``embedding_bag`` over ``grad_out``). The corners are recomputed, not saved.
    """
    with _cpu_threads_for(value, attention_weights.numel() * 4):
        n, s, m, d = value.shape
        _, lq, _, n_levels, n_points, _ = loc.shape
        rows = n * s * m
        g = grad_out.reshape(n * lq * m, d).to(value.dtype)  # [N*Lq*M, D]
        c = _corners(spatial_shapes, loc, s)
        attn = attention_weights.reshape(n * lq, -1)  # [N*Lq, M*L*P]
        grad_value = grad_loc = grad_attn = None
        if needs[1] or needs[2]:
            pattern = _csr(c.index, rows, g.new_zeros(c.index.numel()))
            dots = torch.sparse.sampled_addmm(pattern, g, value.reshape(rows, d).t(), beta=0).values()
            d00, d01, d10, d11 = dots.view(n * lq, m, 4, -1).unbind(2)  # [N*Lq, M, L*P] per corner
            d00, d01, d10, d11 = (t.reshape(n * lq, -1) for t in (d00, d01, d10, d11))  # [N*Lq, M*L*P]
            along_x = (c.wy[0] * d00 + c.wy[1] * d10, c.wy[0] * d01 + c.wy[1] * d11)  # by x neighbour
            along_y = (c.wx[0] * d00 + c.wx[1] * d01, c.wx[0] * d10 + c.wx[1] * d11)  # by y neighbour
            grad_attn = (c.wx[0] * along_x[0] + c.wx[1] * along_x[1]).view_as(attention_weights)
            width, height, _ = _level_constants(spatial_shapes, m, n_points, loc.device)
            gx = (c.vx[1] * along_x[1] - c.vx[0] * along_x[0]) * attn * width  # [N*Lq, M*L*P]
            gy = (c.vy[1] * along_y[1] - c.vy[0] * along_y[0]) * attn * height
            grad_loc = torch.stack([gx, gy], -1).view_as(loc)
        if needs[0]:
            weight = _corner_weights(c, attn, m).view(-1)  # [N*Lq*M*K]
            order, perm = c.index.view(-1).sort()  # corners grouped by value row
            counts = torch.bincount(order, minlength=rows)  # [N*S*M]
            offsets = torch.zeros_like(counts)
            torch.cumsum(counts[:-1], 0, out=offsets[1:])
            bag_of = torch.div(perm, c.index.shape[1], rounding_mode="floor")  # [N*Lq*M*K] its (query, head)
            grad_value = F.embedding_bag(bag_of, g, offsets, mode="sum",
                                         per_sample_weights=weight.index_select(0, perm)).view(n, s, m, d)
    return grad_value, grad_loc, grad_attn


FUSED = _Core(_fused_forward, _fused_grads)


def ms_deform_attn_fused(value: torch.Tensor, spatial_shapes: torch.Tensor,
                         sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention as one gather over all levels, points and corners.

    Same arguments and result as :func:`ms_deform_attn_reference`; saves only its inputs for backward.
    Computes in float32 for lower-precision inputs (bf16 / fp16) and returns their dtype.
    """
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
    out = _CoreDeformAttn.apply(FUSED, value.to(dtype), spatial_shapes, sampling_locations.to(dtype),
                                 attention_weights.to(dtype))
    return out.to(value.dtype)


def ms_deform_attn_export(value: torch.Tensor, spatial_shapes: torch.Tensor,
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention in an export-friendly form: gather the bilinear corners, weighted sum.

    The corners and their bilinear weights are those of the fused path (:func:`_corners`: zero padding,
    ``align_corners=False``); instead of ``embedding_bag`` the corner rows are gathered with plain indexing
    (ONNX ``Gather``) and reduced by a batched matmul with their bilinear x attention weights, ops every
    ONNX runtime has. Same arguments and result as :func:`ms_deform_attn_reference`; differentiable by
    autograd, but it materialises every sample, so use it for inference graphs.
    """
    n, s, m, d = value.shape
    lq = sampling_locations.shape[1]
    c = _corners(spatial_shapes, sampling_locations, s)
    weights = _corner_weights(c, attention_weights.reshape(n * lq, -1), m)  # [N*Lq*M, K], K = 4*L*P
    rows = value.reshape(n * s * m, d)[c.index.long()]  # [N*Lq*M, K, D]
    out = torch.matmul(weights.unsqueeze(1).to(value.dtype), rows)  # [N*Lq*M, 1, D]
    return out.reshape(n, lq, m * d)


class _ProjectedDeformAttn(torch.autograd.Function):
    """``value = input @ W.T + b`` (zero where padded), then deformable attention, saving the projection's
    input instead of ``value``: backward recomputes the projection (one matmul). In Deformable DETR the six
    decoder layers project the same encoder memory, which is then kept once instead of six values.
    The weight is read outside ``nn.Linear.forward``: fine for DDP and ZeRO-1/2, not for ZeRO-3 (which
    gathers parameters in the owning module's forward)."""

    @staticmethod
    def forward(ctx, core: _Core, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                keep: torch.Tensor | None, spatial_shapes: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor,
                n_heads: int, mm_dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            value = _project(x, weight, bias, keep, n_heads, mm_dtype, loc.dtype)
            out = core.forward(value, spatial_shapes, loc, attn)
        ctx.core, ctx.n_heads, ctx.mm_dtype = core, n_heads, mm_dtype
        ctx.save_for_backward(x, weight, bias, keep, spatial_shapes, loc, attn)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, keep, spatial_shapes, loc, attn = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_value = needs[1] or needs[2] or needs[3]
        mm = ctx.mm_dtype
        with torch.autocast(x.device.type, enabled=False):
            value = _project(x, weight, bias, keep, ctx.n_heads, mm, loc.dtype)
            gv, gl, ga = ctx.core.grads((need_value, needs[6], needs[7]), grad_out, value, spatial_shapes, loc,
                                        attn)
            gx = gw = gb = None
            if need_value:
                gv = gv.flatten(2)  # [N, S, C]
                if keep is not None:
                    gv = gv * keep
                if needs[1]:
                    gx = (gv.to(mm) @ weight.to(mm)).to(x.dtype)
                if needs[2]:
                    gw = (gv.flatten(0, 1).t().to(mm) @ x.flatten(0, 1).to(mm)).to(weight.dtype)
                if needs[3]:
                    gb = gv.sum((0, 1)).to(bias.dtype)
        return None, gx, gw, gb, None, None, gl, ga, None, None


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor | None,
             n_heads: int, mm_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """``(N, S, C)`` input -> ``(N, S, heads, C / heads)`` value in ``dtype``; the matmul runs in ``mm_dtype``."""
    value = F.linear(x.to(mm_dtype), weight.to(mm_dtype), None if bias is None else bias.to(mm_dtype)).to(dtype)
    if keep is not None:
        value = value * keep
    return value.view(*x.shape[:2], n_heads, -1)


def ms_deform_attn_projected(input_flatten: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor, padding_mask: torch.Tensor | None = None,
                             impl: str = "auto") -> torch.Tensor:
    """Value projection + multi-scale deformable attention, saving ``input_flatten`` instead of the value.

    The same function as ``ms_deform_attn(F.linear(input_flatten, weight, bias).masked_fill(padding_mask, 0)
    .view(N, S, heads, -1), ...)`` with ``heads = sampling_locations.shape[2]``, for the fused and Triton paths
    (``impl="reference"`` and ``impl="export"`` compute exactly that expression). Under autocast the
    projection's matmuls run in the autocast dtype, the sampling in float32.

    Args:
        input_flatten: ``(N, S, C)`` all levels flattened.
        weight, bias: the value projection, ``(C, C)`` and ``(C,)``.
        spatial_shapes, sampling_locations, attention_weights: as for :func:`ms_deform_attn`.
        padding_mask: ``(N, S)`` bool, True where the input is padding (its value is zero).
        impl: as for :func:`ms_deform_attn`.

    Returns:
        ``(N, Lq, C)`` in the dtype of ``input_flatten``.
    """
    n, s, c = input_flatten.shape
    m = sampling_locations.shape[2]
    impl = resolve_impl(impl, input_flatten.device)
    if impl in ("reference", "export"):
        value = F.linear(input_flatten, weight, bias)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        fn = ms_deform_attn_reference if impl == "reference" else ms_deform_attn_export
        return fn(value.view(n, s, m, c // m), spatial_shapes, sampling_locations, attention_weights)
    _check_shapes(input_flatten.view(n, s, m, c // m), spatial_shapes, sampling_locations, attention_weights)
    dev = input_flatten.device.type
    mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else input_flatten.dtype
    dtype = torch.float64 if input_flatten.dtype == torch.float64 else torch.float32
    keep = None if padding_mask is None else (~padding_mask)[..., None].to(dtype)
    out = _ProjectedDeformAttn.apply(_core(impl, input_flatten), input_flatten, weight, bias, keep, spatial_shapes,
                                     sampling_locations.to(dtype), attention_weights.to(dtype), m, mm_dtype)
    return out.to(input_flatten.dtype)


def _core(impl: str, like: torch.Tensor) -> _Core:
    """The kernel pair of a resolved ``impl`` (``"fused"`` or ``"triton"``) for tensors like ``like``."""
    if impl == "triton":
        if _triton_fn() is None:
            raise RuntimeError("impl='triton' needs the triton package (it ships with CUDA builds of torch)")
        from medssl.detection.ms_deform_triton import triton_core

        return triton_core(like)
    return FUSED


@cache
def _triton_fn():
    """:func:`ms_deform_attn_triton`, or None when Triton does not import (CPU-only installs)."""
    try:
        from medssl.detection.ms_deform_triton import ms_deform_attn_triton
    except ImportError as err:
        _log.info("ms_deform_attn: Triton unavailable (%s); CUDA tensors take the fused PyTorch path", err)
        return None
    return ms_deform_attn_triton


@cache
def _log_choice(device_type: str, impl: str) -> None:
    _log.info("ms_deform_attn: %s tensors use the %s path", device_type, impl)


def resolve_impl(impl: str, device: torch.device) -> str:
    """The path ``impl`` means for tensors on ``device``: ``"auto"`` becomes ``"triton"`` for CUDA when Triton
    imports, else ``"fused"``; anything not in :data:`IMPLS` raises ValueError."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and _triton_fn() is not None else "fused"
        _log_choice(device.type, impl)
    return impl


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: ``(N, S, heads, head_dim)``.
        spatial_shapes: ``(L, 2)`` long tensor of (H, W).
        sampling_locations: ``(N, Lq, heads, L, P, 2)`` in [0, 1] (x, y).
        attention_weights: ``(N, Lq, heads, L, P)``.
        impl: ``"auto"`` (Triton for CUDA tensors when available, else fused), ``"fused"`` (one
            embedding_bag, fused backward), ``"reference"`` (per-level grid_sample), ``"triton"``, or
            ``"export"`` (gather + weighted sum, for ONNX graphs).

    Returns:
        ``(N, Lq, heads * head_dim)``.

    Example:
        >>> v = torch.randn(1, 20, 2, 4); shapes = torch.tensor([[4, 4], [2, 2]])
        >>> loc = torch.rand(1, 3, 2, 2, 4, 2); w = torch.rand(1, 3, 2, 2, 4)
        >>> ms_deform_attn(v, shapes, loc, w).shape
        torch.Size([1, 3, 8])
    """
    impl = resolve_impl(impl, value.device)
    if impl == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "export":
        _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
        return ms_deform_attn_export(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "triton":
        fn = _triton_fn()
        if fn is None:
            raise RuntimeError("impl='triton' needs the triton package (it ships with CUDA builds of torch)")
        _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
        return fn(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_fused(value, spatial_shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module with the reference initialisation.

    Args:
        d_model: hidden size.
        n_levels: number of feature levels.
        n_heads: attention heads (``d_model`` must be divisible by it).
        n_points: sampling points per head and level.
        impl: path passed to :func:`ms_deform_attn` (one of :data:`IMPLS`).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 impl: str = "auto") -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
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
        m, ll, p = self.n_heads, self.n_levels, self.n_points
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
        out = ms_deform_attn_projected(input_flatten, self.value_proj.weight, self.value_proj.bias, spatial_shapes,
                                       loc, attn, padding_mask, self.impl)  # [N, Lq, C]
        return self.output_proj(out)


def set_attn_impl(model: nn.Module, impl: str) -> int:
    """Switch every :class:`MSDeformAttn` in ``model`` to path ``impl`` (e.g. ``"export"`` before ONNX export);
    returns how many modules were switched. The weights are untouched."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    mods = [mod for mod in model.modules() if isinstance(mod, MSDeformAttn)]
    for mod in mods:
        mod.impl = impl
    return len(mods)
