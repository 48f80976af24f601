"""Multi-scale deformable attention as Triton kernels (forward and backward), for CUDA tensors.

Imported lazily by :mod:`medssl.detection.deformable_attn` (``impl="auto"`` takes it for CUDA tensors when
Triton imports). One program handles a block of queries of one (image, head): for every level, point
and bilinear corner it gathers the ``head_dim`` values of the corner (zero outside the map,
``align_corners=False``) and accumulates them weighted by bilinear x attention weights. The backward
kernel recomputes the corners (nothing but the inputs is saved), takes the per-corner dot products with
the output gradient for the attention and location gradients, and scatters the value gradient with
atomic adds. With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels run on CPU
tensors through Triton's interpreter (how the tests check them without a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from medssl.detection.deform_core import KernelDeformAttn, KernelPair, level_starts

__all__ = ["ms_deform_attn_triton", "triton_core", "triton_forward", "triton_grads", "triton_usable"]


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on tensors like ``t`` (CUDA, or any device under the interpreter)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _corner(value_row0, shapes_h, shapes_w, start, x0, y0, fx, fy, dx: tl.constexpr, dy: tl.constexpr, q_ok, d_ok,
            d_off, MD: tl.constexpr, ACC: tl.constexpr):
    """One bilinear corner (dx, dy in {0, 1}) of a block of sampling points.

    Returns its offsets from ``value[n, 0, h, 0]`` and mask (``[BQ, BD]``), its values (``[BQ, BD]``, 0
    outside the map) and its linear weights along x and y (``[BQ]``).
    """
    cx = x0 + dx
    cy = y0 + dy
    ok = q_ok & (cx >= 0) & (cx < shapes_w) & (cy >= 0) & (cy < shapes_h)  # [BQ] inside the map
    token = (start + cy * shapes_w + cx).to(tl.int64)
    off = token[:, None] * MD + d_off[None, :]
    mask = ok[:, None] & d_ok[None, :]
    v = tl.load(value_row0 + off, mask=mask, other=0.0).to(ACC)
    return off, mask, v, fx * dx + (1 - fx) * (1 - dx), fy * dy + (1 - fy) * (1 - dy)


@triton.jit
def _point(loc, attn, i, q_ok, hh, ww, ACC: tl.constexpr):
    """Attention weight, top-left corner and fractional offsets of sampling points ``i``, each ``[BQ]``.

    Pixel centre k sits at (k + 0.5) / size (``align_corners=False``).
    """
    a = tl.load(attn + i, mask=q_ok, other=0.0).to(ACC)
    x = tl.load(loc + 2 * i, mask=q_ok, other=0.0).to(ACC) * ww - 0.5
    y = tl.load(loc + 2 * i + 1, mask=q_ok, other=0.0).to(ACC) * hh - 0.5
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return a, x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f


@triton.jit
def _fwd_kernel(value, shapes, starts, loc, attn, out, S, Lq,
                M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                BQ: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """out[n, q, h, :] = sum over levels, points, corners of weight * value[n, corner, h, :]."""
    n_h = tl.program_id(1)
    n = n_h // M
    h = n_h % M
    q = tl.program_id(0) * BQ + tl.arange(0, BQ)  # [BQ]
    q_ok = q < Lq
    d_off = tl.arange(0, BD)
    d_ok = d_off < D
    value_row0 = value + (n.to(tl.int64) * S * M + h) * D  # value[n, 0, h, 0]; token t at + t*M*D
    qh = (n.to(tl.int64) * Lq + q) * M + h  # [BQ] row of (n, q, h)
    acc = tl.zeros([BQ, BD], dtype=ACC)
    for lvl in tl.static_range(L):
        hh = tl.load(shapes + 2 * lvl)
        ww = tl.load(shapes + 2 * lvl + 1)
        start = tl.load(starts + lvl)
        for p in tl.static_range(P):
            i = (qh * L + lvl) * P + p  # [BQ] index into attn / (loc // 2)
            a, x0, y0, fx, fy = _point(loc, attn, i, q_ok, hh, ww, ACC)
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    _, _, v, wx, wy = _corner(value_row0, hh, ww, start, x0, y0, fx, fy, dx, dy, q_ok, d_ok, d_off,
                                              M * D, ACC)
                    acc += (a * wx * wy)[:, None] * v
    tl.store(out + qh[:, None] * D + d_off[None, :], acc.to(out.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_kernel(value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn, S, Lq,
                M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                BQ: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """Gradients of :func:`_fwd_kernel`: value by atomic scatter, locations and attention per point."""
    n_h = tl.program_id(1)
    n = n_h // M
    h = n_h % M
    q = tl.program_id(0) * BQ + tl.arange(0, BQ)
    q_ok = q < Lq
    d_off = tl.arange(0, BD)
    d_ok = d_off < D
    value_row0 = value + (n.to(tl.int64) * S * M + h) * D
    grad_row0 = grad_value + (n.to(tl.int64) * S * M + h) * D
    qh = (n.to(tl.int64) * Lq + q) * M + h
    g = tl.load(grad_out + qh[:, None] * D + d_off[None, :], mask=q_ok[:, None] & d_ok[None, :],
                other=0.0).to(ACC)  # [BQ, BD]
    for lvl in tl.static_range(L):
        hh = tl.load(shapes + 2 * lvl)
        ww = tl.load(shapes + 2 * lvl + 1)
        start = tl.load(starts + lvl)
        for p in tl.static_range(P):
            i = (qh * L + lvl) * P + p
            a, x0, y0, fx, fy = _point(loc, attn, i, q_ok, hh, ww, ACC)
            g_attn = tl.zeros([BQ], dtype=ACC)
            g_x = tl.zeros([BQ], dtype=ACC)
            g_y = tl.zeros([BQ], dtype=ACC)
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    off, ok, v, wx, wy = _corner(value_row0, hh, ww, start, x0, y0, fx, fy, dx, dy, q_ok, d_ok,
                                                 d_off, M * D, ACC)
                    dot = tl.sum(v * g, axis=1)  # [BQ] grad_out . value at this corner (0 outside the map)
                    g_attn += wx * wy * dot
                    g_x += (2 * dx - 1) * wy * dot  # d wx / d x = -1 (low) or +1 (high neighbour)
                    g_y += (2 * dy - 1) * wx * dot
                    share = (a * wx * wy)[:, None] * g  # [BQ, BD] this corner's part of grad_value
                    tl.atomic_add(grad_row0 + off, share.to(grad_value.dtype.element_ty), mask=ok)
            tl.store(grad_attn + i, g_attn.to(grad_attn.dtype.element_ty), mask=q_ok)
            tl.store(grad_loc + 2 * i, (g_x * a * ww).to(grad_loc.dtype.element_ty), mask=q_ok)
            tl.store(grad_loc + 2 * i + 1, (g_y * a * hh).to(grad_loc.dtype.element_ty), mask=q_ok)


def _launch_args(value: torch.Tensor, spatial_shapes: torch.Tensor, loc: torch.Tensor) -> tuple:
    """Grid, level tables and compile-time sizes shared by the two kernels."""
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    shapes = spatial_shapes.to(device=value.device, dtype=torch.int32).contiguous()  # [L, 2] (H, W)
    starts = level_starts(shapes).to(torch.int32)  # [L]
    block_q = 64 if value.is_cuda else 128  # the interpreter runs fewer, larger programs faster
    grid = (triton.cdiv(lq, block_q), n * m)
    acc = tl.float64 if value.dtype == torch.float64 else tl.float32
    consts = {"M": m, "D": d, "L": n_levels, "P": n_points, "BQ": block_q, "BD": triton.next_power_of_2(d),
              "ACC": acc}
    return grid, shapes, starts, s, lq, consts


def triton_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor
                   ) -> torch.Tensor:
    """The forward kernel: ``(N, Lq, heads * head_dim)`` in the dtype of ``value``."""
    value, loc, attn = (t.contiguous() for t in (value, loc, attn))
    n, _, m, d = value.shape
    grid, shapes, starts, s, lq, consts = _launch_args(value, spatial_shapes, loc)
    out = value.new_empty(n, lq, m * d)
    _fwd_kernel[grid](value, shapes, starts, loc, attn, out, s, lq, **consts)
    return out


def triton_grads(needs: tuple[bool, bool, bool], grad_out: torch.Tensor, value: torch.Tensor,
                 spatial_shapes: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The backward kernel: gradients for (value, locations, attention weights); one launch gives all three,
    so ``needs`` is not consulted."""
    value, loc, attn = (t.contiguous() for t in (value, loc, attn))
    grid, shapes, starts, s, lq, consts = _launch_args(value, spatial_shapes, loc)
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)  # atomics accumulate here
    grad_loc = torch.empty_like(loc)
    grad_attn = torch.empty_like(attn)
    _bwd_kernel[grid](value, shapes, starts, loc, attn, grad_out.contiguous(), grad_value, grad_loc,
                      grad_attn, s, lq, **consts)
    return grad_value.to(value.dtype), grad_loc, grad_attn


def triton_core(like: torch.Tensor) -> KernelPair:
    """The Triton kernel pair for tensors like ``like``; RuntimeError where the kernels cannot run (CPU
    tensors without ``TRITON_INTERPRET=1``)."""
    if not triton_usable(like):
        raise RuntimeError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                           f"imported), got a tensor on {like.device}")
    return KernelPair(triton_forward, triton_grads)


def ms_deform_attn_triton(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                          attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention through the Triton kernels.

    Same arguments and result as :func:`medssl.detection.deformable_attn.ms_deform_attn_reference`.
    Raises RuntimeError for tensors the kernels cannot run on (CPU without ``TRITON_INTERPRET=1``).
    """
    core = triton_core(value)
    dtype = sampling_locations.dtype if value.dtype != torch.float64 else torch.float64
    return KernelDeformAttn.apply(core, value, spatial_shapes, sampling_locations.to(dtype),
                                 attention_weights.to(dtype))
