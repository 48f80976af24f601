"""Masked autoencoder with a ViT encoder, following the official MAE (He et al., 2022) exactly.

Parameter names are the official ones (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.*`, `norm`,
`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.N.*`, `decoder_norm`, `decoder_pred`),
so an official MAE pretraining checkpoint loads straight in. Unlike the reference, any number of input
channels and non-square images work, and volumes too: `spatial_dims=3` takes [N, C, D, H, W] crops with cubic
or anisotropic patches (a Conv3d patch embedding under the same name, a 3-D sin-cos position embedding, the
same masking, decoder and loss on [N, L, prod(patch) * C] patches). `cls_token=False` drops the class token
(MONAI's ViT and UNETR have none; see `medssl.hub` for loading a 3-D encoder there).

Example:
    >>> mae = create_mae("mae_vit_tiny_patch16", img_size=64, in_chans=1, decoder_embed_dim=128,
    ...                  decoder_depth=2, decoder_num_heads=4)
    >>> loss, pred, mask = mae(torch.rand(2, 1, 64, 64))
    >>> pred.shape, mask.shape
    (torch.Size([2, 16, 256]), torch.Size([2, 16]))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from medssl.models.attention import attention_class
from medssl.models.pos_embed import sincos_nd
from medssl.models.vit import get_cfg


def _tuple(x: int | Sequence[int], n: int, what: str) -> tuple[int, ...]:
    out = (int(x),) * n if isinstance(x, int) else tuple(int(v) for v in x)
    if len(out) != n:
        raise ValueError(f"{what} {x!r} must be one int or {n} ints for {n}-D inputs")
    return out


class PatchEmbed3d(nn.Module):
    """Volume to patch tokens: a Conv3d with stride = kernel = patch, flattened row-major over (d, h, w).

    The attribute names (`proj`) match timm's `PatchEmbed`, so the state-dict key is `patch_embed.proj.weight`
    ([D, C, pd, ph, pw]) in 2-D and 3-D alike.
    """

    def __init__(self, img_size: tuple[int, int, int], patch_size: tuple[int, int, int], in_chans: int,
                 embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = tuple(img_size), tuple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(img_size, patch_size))
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"input volume {tuple(x.shape[2:])} does not match the model's {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, D, d, h, w] -> [N, L, D]


def patchify(imgs: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """[N, C, S1, .., Sn] -> [N, L, p1*..*pn*C]: patches row-major over the grid, each flattened with the channel
    innermost (the reference's 2-D `nchpwq -> nhwpqc`, for any n)."""
    n_, c, *sizes = imgs.shape
    n = len(patch)
    if len(sizes) != n or any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"images of shape {tuple(imgs.shape)} do not fit patch size {tuple(patch)}")
    grid = [s // p for s, p in zip(sizes, patch)]
    shape = [n_, c] + [v for g, p in zip(grid, patch) for v in (g, p)]
    x = imgs.reshape(shape)  # [N, C, g1, p1, .., gn, pn]
    x = x.permute(0, *range(2, 2 + 2 * n, 2), *range(3, 3 + 2 * n, 2), 1)  # [N, g1..gn, p1..pn, C]
    return x.reshape(n_, math.prod(grid), math.prod(patch) * c)


def unpatchify(x: torch.Tensor, patch: Sequence[int], grid: Sequence[int], chans: int) -> torch.Tensor:
    """[N, L, p1*..*pn*C] -> [N, C, g1*p1, .., gn*pn] (inverse of `patchify`)."""
    n = len(patch)
    if x.shape[1] != math.prod(grid) or x.shape[2] != math.prod(patch) * chans:
        raise ValueError(f"patch tensor {tuple(x.shape)} does not fit grid {tuple(grid)}, patch {tuple(patch)}, "
                         f"{chans} ch")
    x = x.reshape(x.shape[0], *grid, *patch, chans)  # [N, g1..gn, p1..pn, C]
    order = [0, 2 * n + 1] + [v for i in range(n) for v in (1 + i, 1 + n + i)]
    x = x.permute(*order)  # [N, C, g1, p1, .., gn, pn]
    return x.reshape(x.shape[0], chans, *[g * p for g, p in zip(grid, patch)])


class MaskedAutoencoder(nn.Module):
    """MAE: ViT encoder on the visible patches, light transformer decoder predicting the removed pixels."""

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int | Sequence[int] = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512,
                 decoder_depth: int = 8, decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = False, attn_impl: str | None = None, drop_path_rate: float = 0.0,
                 spatial_dims: int = 2, cls_token: bool = True):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims, self.in_chans = spatial_dims, in_chans
        self.img_size = _tuple(img_size, spatial_dims, "img_size")
        self.patch = _tuple(patch_size, spatial_dims, "patch_size")  # per axis
        # an int where the patch is cubic / square (what 2-D callers read), else the per-axis tuple
        self.patch_size: int | tuple[int, ...] = self.patch[0] if len(set(self.patch)) == 1 else self.patch
        if any(s < p for s, p in zip(self.img_size, self.patch)):
            raise ValueError(f"img_size {self.img_size} is smaller than one patch ({self.patch_size} px)")
        if any(s % p for s, p in zip(self.img_size, self.patch)):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        for dim, heads, what in ((embed_dim, num_heads, "encoder"), (decoder_embed_dim, decoder_num_heads,
                                                                      "decoder")):
            if dim % heads:
                raise ValueError(f"{what} width {dim} is not divisible by its {heads} heads")
        if spatial_dims == 2 and (embed_dim % 4 or decoder_embed_dim % 4):
            raise ValueError(f"widths {embed_dim} / {decoder_embed_dim} must be divisible by 4 for the 2-D sin-cos "
                             "position embedding")
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch))
        self.norm_pix_loss = norm_pix_loss
        self.num_prefix = 1 if cls_token else 0
        norm = functools.partial(nn.LayerNorm, eps=1e-6)  # as the reference
        attn = attention_class(attn_impl)

        # encoder
        if spatial_dims == 2:
            self.patch_embed = PatchEmbed(self.img_size, self.patch, in_chans, embed_dim)
        else:
            self.patch_embed = PatchEmbed3d(self.img_size, self.patch, in_chans, embed_dim)  # type: ignore[assignment]
        num_patches = math.prod(self.grid)
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix, embed_dim), requires_grad=False)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i],
                  norm_layer=norm, attn_layer=attn) for i in range(depth)])
        self.norm = norm(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=norm, attn_layer=attn) for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, math.prod(self.patch) * in_chans, bias=True)

        patch_cfg = self.patch_size if isinstance(self.patch_size, int) else list(self.patch_size)
        self.config = dict(img_size=list(self.img_size), patch_size=patch_cfg, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                           decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                           norm_pix_loss=norm_pix_loss)
        if spatial_dims != 2 or not cls_token:  # 2-D configs stay as they were
            self.config.update(spatial_dims=spatial_dims, cls_token=cls_token)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference initialisation: fixed sin-cos pos embeds, xavier Linear/patch conv, N(0, .02) tokens."""
        cls = self.num_prefix == 1
        self.pos_embed.data.copy_(sincos_nd(self.pos_embed.shape[-1], self.grid, cls_token=cls)[None])
        self.decoder_pos_embed.data.copy_(
            sincos_nd(self.decoder_pos_embed.shape[-1], self.grid, cls_token=cls)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # the conv seen as a Linear
        if cls:
            nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ----------------------------------------------------------------------------------------- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C] (3-D: [N, C, D, H, W] -> [N, L, pd*ph*pw*C]), channel innermost."""
        if imgs.ndim != 2 + self.spatial_dims or imgs.shape[1] != self.in_chans:
            raise ValueError(f"images of shape {tuple(imgs.shape)} do not fit {self.in_chans} channels and "
                             f"{self.spatial_dims}-D patch size {self.patch_size}")
        return patchify(imgs, self.patch)

    def unpatchify(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """[N, L, prod(p)*C] -> [N, C, *S] (inverse of `patchify`; grid defaults to the model's)."""
        return unpatchify(x, self.patch, grid or self.grid, self.in_chans)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keep `int(L * (1 - mask_ratio))` patches per sample chosen by argsort of noise (small = kept).

        Returns:
            x_masked [N, len_keep, D], mask [N, L] (1 = removed, original order), ids_restore [N, L].
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)  # [N, L]
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]  # [N, len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device, dtype=torch.float32)  # fp32 even under bf16
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to the original patch order
        return x_masked, mask, ids_restore

    # ----------------------------------------------------------------------------------------- passes
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Embed, add pos (before masking), mask, prepend cls (+ its zero pos row) if any, run the blocks."""
        x = self.patch_embed(imgs)  # [N, L, D]
        x = x + self.pos_embed[:, self.num_prefix:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, keep, D]
        if self.num_prefix:
            cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)  # [N, 1 + keep, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch (no masking), as a backbone runs: [N, (1 +) L, D] after the final norm."""
        x = self.patch_embed(imgs) + self.pos_embed[:, self.num_prefix:, :]  # [N, L, D]
        if self.num_prefix:
            cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)  # [N, 1 + L, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Append mask tokens, unshuffle, add pos, decode; returns [N, L, prod(p)*C] (cls row removed)."""
        k = self.num_prefix
        x = self.decoder_embed(x)  # [N, k + keep, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + k - x.shape[1], -1)
        x_ = torch.cat([x[:, k:, :], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :k, :], x_], dim=1) + self.decoder_pos_embed  # [N, k + L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, k + L, prod(p)*C]
        return x[:, k:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE averaged over removed patches; norm_pix: target by its mean and unbiased std (any N-D
        patch: the statistics are over the patch's prod(p)*C values)."""
        target = self.patchify(imgs)  # [N, L, prod(p)*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """Returns (loss, pred [N, L, prod(p)*C], mask [N, L] with 1 = removed)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm ViT names (decoder and mask token removed)."""
        return {k: v for k, v in self.state_dict().items() if not is_decoder_key(k)}


def is_decoder_key(key: str) -> bool:
    """True for the MAE decoder's parameters (not part of a backbone)."""
    return key.startswith("decoder_") or key == "mask_token"


_DECODERS = {"base": (512, 8, 16), "large": (512, 8, 16), "huge": (512, 8, 16),
             "small": (256, 4, 8), "tiny": (128, 2, 4)}


def create_mae(name: str = "mae_vit_base_patch16", **overrides: Any) -> MaskedAutoencoder:
    """Build an MAE from a registered ViT: `create_mae("mae_vit_small_patch16", in_chans=1, img_size=224)`.

    Base/large/huge default to the reference decoder (512 wide, 8 blocks, 16 heads); smaller encoders get
    lighter decoders. Any constructor argument of `MaskedAutoencoder` can be overridden.
    """
    arch = name[4:] if name.startswith("mae_") else name
    cfg = get_cfg(arch)
    size = arch.split("_")[1]
    dec_dim, dec_depth, dec_heads = _DECODERS.get(size, (512, 8, 16))
    kwargs: dict[str, Any] = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                  embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                                  decoder_embed_dim=dec_dim, decoder_depth=dec_depth,
                                  decoder_num_heads=dec_heads, mlp_ratio=cfg.mlp_ratio)
    unknown = set(overrides) - set(MaskedAutoencoder.__init__.__code__.co_varnames)
    if unknown:
        raise TypeError(f"create_mae got unknown arguments {sorted(unknown)}")
    kwargs.update(overrides)
    return MaskedAutoencoder(**kwargs)
