"""3-D segmentation on a pretrained 3-D encoder: MONAI's UNETR taking the medssl backbone as its ViT.

UNETR (Hatamizadeh et al., 2022) reads blocks 3, 6, 9 and 12 of a 12-block ViT with 16^3 patches, reshapes
their tokens to volumes and decodes them with convolutional skips to full resolution. `build_unetr` builds
MONAI's UNETR for a backbone's width, heads and crop, puts the backbone's weights into `unetr.vit` with an exact
key check and the MAE's LayerNorm eps; the decoder is freshly initialised. Train it with
`medssl.heads.fit.train_supervised` (the same Engine) and `dice_ce_loss`, score it with `dice_score`.

Example:
    >>> model = build_unetr("runs/demo_pretrain_3d", num_classes=3)  # doctest: +SKIP
    >>> model(torch.zeros(1, 1, 64, 64, 64)).shape  # doctest: +SKIP
    torch.Size([1, 3, 64, 64, 64])
"""

from __future__ import annotations

import os
from typing import Any

import torch  # noqa: F401  (used in the docstring example)
from torch import nn

UNETR_PATCH, UNETR_DEPTH = 16, 12


def build_unetr(backbone: str | os.PathLike | nn.Module, num_classes: int, *, feature_size: int = 16,
                img_size: int | tuple[int, int, int] | None = None, in_chans: int | None = None,
                freeze_backbone: bool = False, **unetr_kwargs: Any) -> nn.Module:
    """MONAI's UNETR whose encoder is the 3-D backbone (a source for `medssl.load_backbone`, or its MONAI ViT).

    Args:
        backbone: backbone folder / run / checkpoint, or a ViT that `medssl.load_backbone` returned.
        num_classes: output channels (background included).
        feature_size: UNETR's decoder width (16 in the paper).
        img_size / in_chans: the crop and channels (default: the backbone's).
        freeze_backbone: train the decoder only.
        unetr_kwargs: other `monai.networks.nets.UNETR` arguments (norm_name, res_block, dropout_rate, ...).

    Raises:
        ValueError: the backbone is not a 12-block ViT with 16^3 patches (what UNETR is built for).
    """
    from monai.networks.nets import UNETR

    from medssl.hub import load_backbone
    from medssl.models.monai_vit import set_layernorm_eps
    from medssl.train.checkpoint import load_exact

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    vit = backbone if isinstance(backbone, nn.Module) else load_backbone(backbone, img_size=img_size,
                                                                         in_chans=in_chans)
    cfg = getattr(vit, "medssl_cfg", None)
    if cfg is None or cfg.get("spatial_dims") != 3:
        raise ValueError("build_unetr needs a 3-D backbone from medssl.load_backbone (a MONAI ViT with medssl_cfg)")
    patch = cfg["patch_size"]
    if patch not in (UNETR_PATCH, [UNETR_PATCH] * 3) or cfg["depth"] != UNETR_DEPTH:
        raise ValueError(f"UNETR takes a {UNETR_DEPTH}-block ViT with {UNETR_PATCH}^3 patches; this backbone has "
                         f"{cfg['depth']} blocks and patch {patch}")
    unetr = UNETR(cfg["in_chans"], num_classes, tuple(cfg["img_size"]), feature_size=feature_size,
                  hidden_size=cfg["embed_dim"], mlp_dim=int(round(cfg["embed_dim"] * cfg["mlp_ratio"])),
                  num_heads=cfg["num_heads"], qkv_bias=True, **unetr_kwargs)
    load_exact(unetr.vit, vit.state_dict(), f"{cfg.get('loaded_from', 'backbone')} into UNETR's encoder")
    set_layernorm_eps(unetr.vit, float(cfg.get("norm_eps", 1e-6)))
    if freeze_backbone:
        for p in unetr.vit.parameters():
            p.requires_grad_(False)
    unetr.medssl_cfg = dict(cfg)
    return unetr
