"""2-D segmentation on ViT features, a dense multi-block probe, a small U-Net baseline, Dice + CE loss.

`ViTSegmenter` is a progressive-upsampling decoder in the spirit of UNETR and the simple feature
pyramid: the deepest chosen block is projected and upsampled x2 per stage until full resolution;
at each stage the map of an earlier block (projected, resized) is concatenated as a skip, and at
full resolution a small conv stem on the input image gives the fine detail ViT tokens lack. It
works for any patch size (stages = ceil(log2 p)), image size and channel count.

`DenseProbe` is the segmentation analogue of the linear probe: frozen encoder, the normalised
tokens of the last k blocks concatenated per patch, BatchNorm2d(affine=False) + 1x1 conv, and
bilinear upsampling of the logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medssl.heads.tokens import (
    block_tokens,
    check_vit,
    freeze,
    patch_size,
    plain_norm,
    resolve_blocks,
    set_drop_path,
)


def _grid(patch: torch.Tensor, x: torch.Tensor, p: int) -> torch.Tensor:
    n, length, d = patch.shape
    h, w = x.shape[-2] // p, x.shape[-1] // p
    if h * w != length:
        raise ValueError(f"image {tuple(x.shape[-2:])} is not a multiple of patch size {p}")
    return patch.transpose(1, 2).reshape(n, d, h, w)  # [N, D, h, w]


def _instance_norm_3d(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=True)


def _conv_block(cin: int, cout: int, spatial_dims: int = 2) -> nn.Sequential:
    # 2-D: BatchNorm; 3-D, where a batch holds two volumes: per-sample InstanceNorm (nnU-Net's choice, and that of
    # MONAI UNETR's decoder, the row this baseline is compared with)
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if spatial_dims == 2 else (nn.Conv3d, _instance_norm_3d)
    return nn.Sequential(
        conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
        conv(cout, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
    )


class ViTSegmenter(nn.Module):
    """ViT encoder + progressive upsampling decoder with multi-block skips.

    Args:
        backbone: timm VisionTransformer.
        num_classes: output classes (background included).
        blocks: blocks to read: an int k (k evenly spaced blocks ending at the last) or indices.
        decoder_dim: channels of the first decoder stage (halved per stage, at least 16).
        image_skip: add a full-resolution conv stem on the input image.
        freeze_backbone: train the decoder only.
        drop_path_rate: if given, reset the backbone's stochastic depth.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, blocks: int | Sequence[int] = 4,
                 decoder_dim: int = 128, image_skip: bool = True, freeze_backbone: bool = False,
                 drop_path_rate: float | None = None):
        super().__init__()
        depth = check_vit(backbone)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(blocks, int):
            if not 1 <= blocks <= depth:
                raise ValueError(f"blocks must be in [1, {depth}], got {blocks}")
            blocks = sorted({round(depth - 1 - i * depth / blocks) for i in range(blocks)})
        self.indices = resolve_blocks(depth, blocks)
        if drop_path_rate is not None:
            set_drop_path(backbone, drop_path_rate)
        self.backbone = freeze(backbone) if freeze_backbone else backbone
        self.frozen = freeze_backbone
        self.p = patch_size(backbone)
        self.stages = max(0, math.ceil(math.log2(self.p)))
        d = backbone.embed_dim
        chans = [max(decoder_dim // 2**s, 16) for s in range(self.stages + 1)]  # stage s output channels
        self.proj = nn.Sequential(nn.Conv2d(d, chans[0], 1), nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True))
        self.ups, self.skips, self.fuse = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        n_skip = len(self.indices) - 1  # skips from the earlier blocks, deepest first
        for s in range(1, self.stages + 1):
            self.ups.append(nn.ConvTranspose2d(chans[s - 1], chans[s], 2, stride=2))
            has_skip = s <= n_skip
            self.skips.append(nn.Conv2d(d, chans[s], 1) if has_skip else nn.Identity())
            self.fuse.append(_conv_block(chans[s] * (2 if has_skip else 1), chans[s]))
        in_chans = backbone.patch_embed.proj.in_channels
        self.stem = _conv_block(in_chans, chans[-1]) if image_skip else None
        self.final = _conv_block(chans[-1] * (2 if image_skip else 1), chans[-1])
        self.out = nn.Conv2d(chans[-1], num_classes, 1)

    def train(self, mode: bool = True) -> ViTSegmenter:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            pairs = block_tokens(self.backbone, x, self.indices)
        maps = [_grid(plain_norm(patch), x, self.p) for patch, _ in pairs]  # each [N, D, H/p, W/p]
        y = self.proj(maps[-1])  # [N, c0, H/p, W/p]
        skips = maps[-2::-1]  # deeper skips first
        for s in range(self.stages):
            y = self.ups[s](y)  # [N, c_s, 2h, 2w]
            if s < len(skips):
                k = self.skips[s](skips[s])  # [N, c_s, h, w]
                k = F.interpolate(k, size=y.shape[-2:], mode="bilinear", align_corners=False)
                y = torch.cat([y, k], dim=1)  # [N, 2 c_s, 2h, 2w]
            y = self.fuse[s](y)
        if y.shape[-2:] != x.shape[-2:]:  # patch size not a power of two
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.stem is not None:
            y = torch.cat([y, self.stem(x)], dim=1)  # [N, 2 c_last, H, W]
        return self.out(self.final(y))  # [N, num_classes, H, W]


class DenseProbe(nn.Module):
    """Frozen ViT; normalised tokens of the last k blocks -> BN2d(affine=False) -> 1x1 conv -> upsample.

    Args:
        backbone: timm VisionTransformer (frozen here).
        num_classes: output classes.
        num_blocks: number of last blocks concatenated (1 = a per-patch linear probe of the last block).
    """

    cacheable = True

    def __init__(self, backbone: nn.Module, num_classes: int, num_blocks: int = 4):
        super().__init__()
        depth = check_vit(backbone)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = freeze(backbone)
        self.indices = resolve_blocks(depth, num_blocks)
        self.p = patch_size(backbone)
        dim = backbone.embed_dim * len(self.indices)
        conv = nn.Conv2d(dim, num_classes, 1)
        nn.init.trunc_normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        self.head = nn.Sequential(nn.BatchNorm2d(dim, affine=False, eps=1e-6), conv,
                                  nn.Upsample(scale_factor=self.p, mode="bilinear", align_corners=False))

    def train(self, mode: bool = True) -> DenseProbe:
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, k D, H/p, W/p] concatenated normalised block maps."""
        pairs = block_tokens(self.backbone, x, self.indices)
        return torch.cat([_grid(plain_norm(patch), x, self.p) for patch, _ in pairs], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [N, num_classes, H, W]


class UNet(nn.Module):
    """Small U-Net baseline (from scratch), `levels` poolings, channels base * 2**level; 2-D or 3-D.

    Args:
        in_chans: image channels.
        num_classes: output classes.
        base: channels of the first level.
        levels: number of down-samplings; every spatial side must be divisible by 2**levels.
        spatial_dims: 2 (images [N, C, H, W]: BatchNorm) or 3 (volumes [N, C, D, H, W]: Conv3d, InstanceNorm3d
            with affine weights, max-pool 2^3: batches of two volumes are too small for BatchNorm).
    """

    def __init__(self, in_chans: int, num_classes: int, base: int = 16, levels: int = 3, spatial_dims: int = 2):
        super().__init__()
        if in_chans < 1 or num_classes < 1 or base < 1 or levels < 1:
            raise ValueError(f"UNet needs positive in_chans/num_classes/base/levels, got "
                             f"{in_chans}/{num_classes}/{base}/{levels}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"UNet spatial_dims must be 2 or 3, got {spatial_dims}")
        ch = [base * 2**i for i in range(levels + 1)]
        self.levels, self.spatial_dims = levels, spatial_dims
        up, conv = (nn.ConvTranspose2d, nn.Conv2d) if spatial_dims == 2 else (nn.ConvTranspose3d, nn.Conv3d)
        self.down = nn.ModuleList([_conv_block(in_chans, ch[0], spatial_dims)] +
                                  [_conv_block(ch[i], ch[i + 1], spatial_dims) for i in range(levels)])
        self.up = nn.ModuleList([up(ch[i + 1], ch[i], 2, stride=2) for i in range(levels)])
        self.dec = nn.ModuleList([_conv_block(2 * ch[i], ch[i], spatial_dims) for i in range(levels)])
        self.out = conv(ch[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, d = 2**self.levels, self.spatial_dims
        if x.ndim != d + 2 or any(s % m for s in x.shape[2:]):
            raise ValueError(f"UNet ({d}-D) input {tuple(x.shape)} must be [N, C, {', '.join('S' * d)}] with sides "
                             f"divisible by {m}")
        pool = F.max_pool2d if d == 2 else F.max_pool3d
        feats = [self.down[0](x)]  # [N, c0, *S]
        for i in range(1, self.levels + 1):
            feats.append(self.down[i](pool(feats[-1], 2)))  # [N, c_i, *S/2^i]
        y = feats[-1]
        for i in reversed(range(self.levels)):
            y = self.dec[i](torch.cat([self.up[i](y), feats[i]], dim=1))  # [N, c_i, *S/2^i]
        return self.out(y)  # [N, num_classes, *S]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                 ce_weight: float = 1.0, ignore_index: int = -100, weight: torch.Tensor | None = None,
                 eps: float = 1e-5) -> torch.Tensor:
    """Cross-entropy + soft Dice loss (1 - mean soft Dice over the classes present in batch or prediction).

    Args:
        logits: [N, C, H, W] (volumes: [N, C, D, H, W]).
        target: [N, H, W] ([N, D, H, W]) class indices (ignore_index pixels are skipped).
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term.
        weight: optional [C] class weights for the cross-entropy.
    """
    if logits.ndim not in (4, 5) or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits must be [N, C, H, W] (or [N, C, D, H, W]) and target [N, H, W] ([N, D, H, W]); "
                         f"got {tuple(logits.shape)} and {tuple(target.shape)}")
    target = target.long()
    ce = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index)
    valid = (target != ignore_index).unsqueeze(1)  # [N, 1, *S]
    prob = logits.float().softmax(dim=1) * valid  # [N, C, *S]
    onehot = F.one_hot(target.clamp(min=0) * valid.squeeze(1), logits.shape[1]).movedim(-1, 1)
    onehot = onehot.float() * valid  # [N, C, *S]
    dims = (0, *range(2, logits.ndim))
    inter = (prob * onehot).sum(dim=dims)  # [C]
    denom = prob.sum(dim=dims) + onehot.sum(dim=dims)  # [C]
    dice = (2 * inter + eps) / (denom + eps)
    return ce_weight * ce + dice_weight * (1 - dice.mean())
