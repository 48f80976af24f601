"""Classification on a 3-D encoder (MONAI's ViT, what `medssl.load_backbone` returns for a 3-D backbone).

- `VolumeClassifier`: the 2-D `FineTuneClassifier` on volumes: the mean of the last block's patch tokens (before
  the backbone's final norm), LayerNorm (fc_norm, eps 1e-6), Linear head (std 2e-5, bias 0); the whole backbone
  trains. MONAI's names (`patch_embedding.*` for the embeddings, `blocks.i.*`) take the same MAE layer ids, so
  `medssl.heads.classify.layer_decay_groups` gives the 2-D layer-wise lr decay. MONAI's ViT has no drop path.
- `VolumeProbe`: the 2-D `LinearProbe` on volumes: frozen backbone, mean of the patch tokens of the last k blocks
  (the last through the backbone's final norm, inner ones through a parameter-free LayerNorm), BatchNorm1d
  (affine=False) and Linear (std 0.01); its `features()` are what kNN reads (`medssl.heads.knn`).
- `resnet3d`: the from-scratch CNN baseline: MONAI's 3-D ResNet with basic blocks (default one per stage, widths
  16-128, a stride-2 7^3 stem and max pooling: a 3-D ResNet-10 at a quarter of the usual width, sized for CPU).

Example:
    >>> vit = medssl.load_backbone("runs/demo_pretrain_3d")  # doctest: +SKIP
    >>> VolumeClassifier(vit, 2)(torch.zeros(1, 1, 64, 64, 64)).shape  # doctest: +SKIP
    torch.Size([1, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medssl.heads.tokens import freeze, plain_norm, probe_head, resolve_blocks


def check_vit3d(backbone: nn.Module) -> int:
    """The depth of a 3-D backbone (MONAI's ViT with `patch_embedding` and `blocks`); ValueError otherwise."""
    for attr in ("blocks", "patch_embedding", "norm"):
        if not hasattr(backbone, attr):
            raise ValueError(f"backbone must be a 3-D medssl backbone (MONAI's ViT; missing {attr!r}); got "
                             f"{type(backbone).__name__}")
    if hasattr(backbone, "cls_token"):
        raise ValueError("this MONAI ViT has a class token (and MONAI's classification head): use a backbone "
                         "pretrained with model.cls_token=false")
    return len(backbone.blocks)


class VolumeClassifier(nn.Module):
    """3-D ViT fine-tuning head: mean-pooled patch tokens -> fc_norm -> Linear (std 2e-5).

    Args:
        backbone: MONAI's ViT (`medssl.load_backbone` of a 3-D backbone, or `build_monai_vit`); all of it trains.
        num_classes: output classes.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        check_vit3d(backbone)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        dim = backbone.norm.normalized_shape[0]
        self.backbone = backbone
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, hidden = self.backbone(x)  # every block's output, [N, L, D] each (un-normalised)
        pooled = hidden[-1].mean(dim=1)  # [N, D]
        return self.head(self.fc_norm(pooled))  # [N, num_classes]


class VolumeProbe(nn.Module):
    """Frozen 3-D ViT + BatchNorm1d(affine=False) + Linear on the mean patch tokens of the last `num_blocks` blocks.

    Args:
        backbone: MONAI's ViT (frozen here).
        num_classes: output classes.
        num_blocks: blocks read (1 = MAE's linear probe, with mean pooling: 3-D backbones have no class token).
    """

    cacheable = True  # features do not change while training: `fit` may precompute them
    pool = "mean"

    def __init__(self, backbone: nn.Module, num_classes: int, num_blocks: int = 1):
        super().__init__()
        depth = check_vit3d(backbone)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = freeze(backbone)
        self.indices = resolve_blocks(depth, num_blocks)
        dim = backbone.norm.normalized_shape[0] * len(self.indices)
        self.head = probe_head(dim, num_classes)

    def train(self, mode: bool = True) -> VolumeProbe:
        super().train(mode)
        self.backbone.eval()  # the encoder stays frozen
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, D, H, W] volumes -> [N, k * D_embed] probe features."""
        last, hidden = self.backbone(x)  # [N, L, D] after the final norm; every block's output
        feats = [last.mean(1) if i == len(hidden) - 1 else plain_norm(hidden[i]).mean(1) for i in self.indices]
        return torch.cat(feats, dim=-1)  # [N, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [N, num_classes]


RESNET3D_GROUPS = 8  # GroupNorm groups of the 3-D ResNet baseline (widths 16-128: 2-16 channels per group)


def resnet3d(num_classes: int, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64, 128),
             layers: Sequence[int] = (1, 1, 1, 1)) -> nn.Module:
    """MONAI's 3-D ResNet (basic blocks, `layers` per stage of `widths` channels, stride-2 7^3 stem, max pooling,
    global average pool, Linear), randomly initialised: the from-scratch baseline of 3-D classification. Its norm
    layers are GroupNorm (8 groups), not MONAI's default BatchNorm: a batch holds two volumes."""
    from monai.networks.nets import ResNet

    if num_classes < 1 or len(widths) != 4 or len(layers) != 4 or any(w % RESNET3D_GROUPS for w in widths):
        raise ValueError(f"resnet3d: need num_classes >= 1 and 4 widths (multiples of {RESNET3D_GROUPS}) / layers; "
                         f"got {num_classes}, {widths}, {layers}")
    net = ResNet("basic", list(layers), list(widths), spatial_dims=3, n_input_channels=in_chans,
                 conv1_t_size=7, conv1_t_stride=2, num_classes=num_classes)
    # MONAI (1.6) passes its `norm` argument to the stem only, so every BatchNorm3d is replaced here (both start at
    # weight 1, bias 0); group, not instance, norm: the last stage of a 64^3 crop is 2^3 voxels (1 at 32^3)
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm3d):
                setattr(parent, name, nn.GroupNorm(RESNET3D_GROUPS, child.num_features))
    return net
