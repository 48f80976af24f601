"""Fixed 2-D sin-cos position embeddings (MAE) and resampling of learned ones to a new grid."""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding of positions `pos` (any shape, flattened) -> [M, embed_dim], [sin | cos]."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos embedding, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([out.sin(), out.cos()], dim=1)  # [M, D]


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos embedding as in the official MAE, for square or non-square grids.

    Half the channels encode the column (width) coordinate, half the row, because the reference builds
    its grid with width first. Rows follow the patch order (row-major over (h, w)).

    Returns:
        float32 tensor [gh * gw (+1), embed_dim]; with `cls_token`, a zero row is prepended.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # [gh, gw] each
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)  # [gh*gw, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a [1, prefix + gh*gw, D] position embedding to another grid with timm's own routine.

    Goes through `timm.layers.resample_abs_pos_embed` (bicubic, antialiased when shrinking, prefix/cls
    tokens untouched, non-square grids), so a checkpoint loaded at another size gives the same weights in
    medssl as in timm.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    from timm.layers import resample_abs_pos_embed

    grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if grid_tokens != old_grid[0] * old_grid[1]:
        raise ValueError(f"pos_embed has {grid_tokens} grid tokens, expected {old_grid[0]}x{old_grid[1]}")
    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=num_prefix_tokens)
