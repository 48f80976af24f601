"""What the deformable-attention paths share: the level offsets of a flattened value and the autograd
function that runs a kernel pair (the fused PyTorch pair of :mod:`medssl.detection.deformable_attn`, the
Triton pair of :mod:`medssl.detection.ms_deform_triton`).

Both modules import this one, and it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["KernelDeformAttn", "KernelPair", "level_starts"]


def level_starts(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """Index of each level's first token in the flattened value: ``(L,)`` from ``(L, 2)`` (H, W) shapes."""
    return torch.cat([spatial_shapes.new_zeros(1), (spatial_shapes[:, 0] * spatial_shapes[:, 1]).cumsum(0)[:-1]])


class KernelPair(NamedTuple):
    """A deformable-attention kernel pair: ``forward(value, shapes, loc, attn)`` and
    ``grads(needs, grad_out, value, shapes, loc, attn) -> (grad_value, grad_loc, grad_attn)``."""

    forward: Callable[..., torch.Tensor]
    grads: Callable[..., tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]


class KernelDeformAttn(torch.autograd.Function):
    """Deformable attention through a kernel pair (``deformable_attn.FUSED``, or the Triton pair); only the
    inputs are saved, the kernels recompute the rest in backward."""

    @staticmethod
    def forward(ctx, core: KernelPair, value: torch.Tensor, spatial_shapes: torch.Tensor,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
        ctx.core = core
        ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights)
        return core.forward(value, spatial_shapes, sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        value, spatial_shapes, loc, attention_weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gv, gl, ga = ctx.core.grads((needs[1], needs[3], needs[4]), grad_out, value, spatial_shapes, loc,
                                    attention_weights)
        return None, gv, None, gl, ga
