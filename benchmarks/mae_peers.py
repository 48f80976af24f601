"""The MAE implementations a user would otherwise pick, configured like medssl's for `speed.py`.

- `hf`: HuggingFace transformers' `ViTMAEForPreTraining` (the `bench` extra).
- `timm_official`: an MAE assembled from timm blocks the way the official MAE code assembles it (timm's
  own attention; masking with `.repeat`-built gather indices; loss over the removed patches).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from medssl.models.pos_embed import sincos_2d


class TimmOfficialMAE(nn.Module):
    """Encoder/decoder of timm `Block`s, forward written as in the official MAE repository."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, dec_dim, dec_depth, dec_heads):
        super().__init__()
        self.p, self.c = patch_size, in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid, True)[None], requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dec_dim, grid, True)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, 4.0, qkv_bias=True) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch_size**2 * in_chans)
        assert n == grid[0] * grid[1]

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(N, L, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(N, -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        tokens = self.mask_token.repeat(N, L + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        h = w = imgs.shape[2] // self.p
        target = imgs.reshape(N, self.c, h, self.p, w, self.p)
        target = torch.einsum("nchpwq->nhwpqc", target).reshape(N, h * w, self.p**2 * self.c)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


def build_peer(name: str, img_size: int, patch: int, in_chans: int, dim: int, depth: int, heads: int,
               dec_dim: int, dec_depth: int, dec_heads: int, mask_ratio: float) -> nn.Module:
    """A peer MAE with medssl's configuration; its forward returns the loss first."""
    if name == "timm_official":
        return TimmOfficialMAE(img_size, patch, in_chans, dim, depth, heads, dec_dim, dec_depth, dec_heads)
    if name == "hf":
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        cfg = ViTMAEConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                           intermediate_size=4 * dim, image_size=img_size, patch_size=patch, num_channels=in_chans,
                           decoder_hidden_size=dec_dim, decoder_num_hidden_layers=dec_depth,
                           decoder_num_attention_heads=dec_heads, decoder_intermediate_size=4 * dec_dim,
                           mask_ratio=mask_ratio, norm_pix_loss=True, qkv_bias=True, layer_norm_eps=1e-6,
                           attn_implementation="sdpa")
        model = ViTMAEForPreTraining(cfg)

        class Wrap(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, imgs, mask_ratio=0.75):
                out = self.m(pixel_values=imgs)
                return out.loss, out.logits, out.mask

        return Wrap(model)
    raise ValueError(f"unknown peer {name!r}")
