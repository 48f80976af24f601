"""Fixed 2-D / N-D sin-cos position embeddings (MAE) and resampling of learned ones to a new grid."""

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


def sincos_nd(embed_dim: int, grid_size: tuple[int, ...], cls_token: bool = False) -> torch.Tensor:
    """N-D sin-cos embedding, the official MAE's 2-D rule extended to any number of axes.

    The channels are split in equal parts, one per axis, in reverse axis order (last axis first: the reference
    builds its 2-D grid width first), each part [sin | cos] of that coordinate. Rows follow the patch order
    (row-major over the grid). For a 2-D grid this is exactly `sincos_2d`; for (d, h, w) the parts are w, h, d.
    Where `embed_dim` is not a multiple of 2 * n (e.g. 512 in 3-D), each part has the largest even width that
    fits and the last few channels are zero.

    Returns:
        float32 tensor [prod(grid) (+1), embed_dim]; with `cls_token`, a zero row is prepended.
    """
    n = len(grid_size)
    part = embed_dim // (2 * n) * 2 if n else 0
    if part < 2:
        raise ValueError(f"embed_dim {embed_dim} is too small for a {n}-D sin-cos embedding (>= {2 * n})")
    coords = torch.meshgrid(*[torch.arange(int(g)) for g in grid_size], indexing="ij")  # n x [*grid]
    emb = torch.cat([sincos_1d(part, c) for c in reversed(coords)], dim=1)  # [prod(grid), n * part]
    emb = torch.cat([emb, emb.new_zeros(emb.shape[0], embed_dim - n * part)], dim=1)  # [prod(grid), D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


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
    return sincos_nd(embed_dim, (gh, gw), cls_token)


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


def resample_pos_embed_3d(pos_embed: torch.Tensor, new_grid: tuple[int, int, int], old_grid: tuple[int, int, int],
                          num_prefix_tokens: int = 0) -> torch.Tensor:
    """Resample a [1, prefix + d*h*w, D] position embedding to another 3-D grid (trilinear, align_corners=False;
    prefix tokens untouched), the 3-D counterpart of `resample_pos_embed`."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    import torch.nn.functional as F

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid.shape[1] != old_grid[0] * old_grid[1] * old_grid[2]:
        raise ValueError(f"pos_embed has {grid.shape[1]} grid tokens, expected {'x'.join(map(str, old_grid))}")
    x = grid.reshape(1, *old_grid, -1).permute(0, 4, 1, 2, 3).float()  # [1, D, d, h, w]
    x = F.interpolate(x, size=tuple(new_grid), mode="trilinear", align_corners=False)
    x = x.permute(0, 2, 3, 4, 1).reshape(1, -1, grid.shape[-1]).to(pos_embed.dtype)  # [1, d'h'w', D]
    return torch.cat([prefix, x], dim=1)
