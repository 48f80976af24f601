"""Read tokens from chosen blocks of a timm VisionTransformer (shared by the heads).

The heads accept any backbone `medssl.load_backbone` returns: a timm `VisionTransformer`. Tokens
come from timm's own `forward_intermediates`, so the backbone's attention backend, positional
embedding and drop path are used as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def check_vit(backbone: nn.Module) -> int:
    """Return the depth of `backbone`, raising ValueError if it is not a timm-style ViT."""
    for attr in ("blocks", "patch_embed", "forward_intermediates", "embed_dim"):
        if not hasattr(backbone, attr):
            raise ValueError(f"backbone must be a timm VisionTransformer (missing {attr!r}); "
                             f"got {type(backbone).__name__}")
    return len(backbone.blocks)


def patch_size(backbone: nn.Module) -> int:
    """Patch size (stride of the token grid) of a ViT backbone; square patches only."""
    ps = backbone.patch_embed.patch_size
    ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
    if ps[0] != ps[1]:
        raise ValueError(f"non-square patches {ps} are not supported by the heads")
    return int(ps[0])


def resolve_blocks(depth: int, blocks: int | Sequence[int]) -> list[int]:
    """Block indices: an int k means the last k blocks; a sequence is used as given (negatives allowed).

    Example:
        >>> resolve_blocks(12, 4)
        [8, 9, 10, 11]
    """
    if isinstance(blocks, int):
        if not 1 <= blocks <= depth:
            raise ValueError(f"number of blocks must be in [1, {depth}], got {blocks}")
        return list(range(depth - blocks, depth))
    out = sorted({b % depth if -depth <= b < depth else -1 for b in blocks})
    if not out or out[0] < 0:
        raise ValueError(f"block indices must lie in [-{depth}, {depth}), got {list(blocks)}")
    return out


def block_tokens(backbone: nn.Module, x: torch.Tensor,
                 indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Un-normalised outputs of the chosen blocks.

    Args:
        backbone: timm VisionTransformer.
        x: [N, C, H, W] images.
        indices: sorted block indices.

    Returns:
        one (patch tokens [N, L, D], prefix tokens [N, P, D]) pair per index; P may be 0.
    """
    out = backbone.forward_intermediates(x, indices=list(indices), return_prefix_tokens=True, norm=False,
                                         stop_early=True, output_fmt="NLC", intermediates_only=True)
    pairs = []
    for item in out:
        if isinstance(item, tuple):
            pairs.append((item[0], item[1]))
        else:  # backbone without prefix tokens
            pairs.append((item, item[:, :0]))
    return pairs


def plain_norm(t: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm over the channel dim (eps 1e-6), for reading inner blocks."""
    return F.layer_norm(t, t.shape[-1:], eps=1e-6)


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of `module` and put it in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """The MAE linear probe's head: BatchNorm1d without affine (eps 1e-6), then a Linear with weights
    trunc_normal(std 0.01) and zero bias. [N, dim] features -> [N, num_classes] logits."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 (first block) to `rate` (last block), as in timm/MAE."""
    from timm.layers import DropPath

    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    depth = check_vit(backbone)
    for i, blk in enumerate(backbone.blocks):
        r = rate * i / max(depth - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(r) if r > 0 else nn.Identity())
