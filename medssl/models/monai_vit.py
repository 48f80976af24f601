"""A 3-D medssl encoder as MONAI's `monai.networks.nets.ViT` (the encoder of MONAI's UNETR): names and layout.

MONAI's ViT (read from its source, monai 1.x) has the same computation as a timm / MAE ViT without a class token:
a strided Conv3d patch embedding flattened row-major over (d, h, w), a learned [1, L, D] position embedding added
to it, pre-norm transformer blocks (qkv packed as (3, heads, head_dim) like timm, exact GELU), a final LayerNorm.
Only the names differ, plus two things handled here:

- every MONAI block owns a `norm_cross_attn` LayerNorm that is never used without cross-attention; these are the
  only keys the checkpoint cannot fill (`unused_monai_keys`: they keep MONAI's identity initialisation);
- MONAI's LayerNorms use eps 1e-5, the MAE's 1e-6: the built model gets the backbone's eps so that it computes
  the same features.

A backbone with a class token has no MONAI equivalent (MONAI's ViT with a class token adds a classification head
and returns its output): pretrain 3-D backbones with `model.cls_token=false` (the default).

Example:
    >>> vit = build_monai_vit(dict(embed_dim=192, depth=2, num_heads=3, patch_size=16, img_size=[32, 32, 32],
    ...                            in_chans=1, mlp_ratio=4.0))  # doctest: +SKIP
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

UNUSED_MONAI_KEYS = re.compile(r"blocks\.\d+\.norm_cross_attn\.(weight|bias)")

_RENAMES = (  # medssl / timm name -> MONAI name
    ("patch_embed.proj.", "patch_embedding.patch_embeddings."),
    ("pos_embed", "patch_embedding.position_embeddings"),
    (".attn.proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.linear1."),
    (".mlp.fc2.", ".mlp.linear2."),
)


def _triple(x: int | list[int] | tuple[int, ...]) -> tuple[int, int, int]:
    out = (int(x),) * 3 if isinstance(x, int) else tuple(int(v) for v in x)
    if len(out) != 3:
        raise ValueError(f"expected one int or 3 ints, got {x!r}")
    return out  # type: ignore[return-value]


def build_monai_vit(arch: dict[str, Any], img_size: int | tuple[int, ...] | None = None,
                    in_chans: int | None = None) -> nn.Module:
    """A randomly initialised `monai.networks.nets.ViT` for a 3-D backbone record (embed_dim, depth, num_heads,
    patch_size, img_size, in_chans, mlp_ratio, norm_eps); `img_size` / `in_chans` override the record's."""
    try:
        from monai.networks.nets import ViT
    except ImportError as exc:  # optional dependency
        raise ImportError("3-D backbones load into MONAI's ViT: pip install monai") from exc
    if arch.get("cls_token"):
        raise ValueError("this 3-D backbone has a class token, which MONAI's ViT (and UNETR) cannot take without a "
                         "classification head: pretrain with model.cls_token=false")
    vit = ViT(in_channels=int(in_chans or arch["in_chans"]), img_size=_triple(img_size or arch["img_size"]),
              patch_size=_triple(arch["patch_size"]), hidden_size=int(arch["embed_dim"]),
              mlp_dim=int(round(arch["embed_dim"] * arch.get("mlp_ratio", 4.0))), num_layers=int(arch["depth"]),
              num_heads=int(arch["num_heads"]), proj_type="conv", pos_embed_type="learnable", classification=False,
              dropout_rate=0.0, spatial_dims=3, qkv_bias=True)
    set_layernorm_eps(vit, float(arch.get("norm_eps", 1e-6)))
    return vit


def set_layernorm_eps(module: nn.Module, eps: float) -> nn.Module:
    """Set the eps of every LayerNorm in `module` (e.g. a MONAI ViT or UNETR) to the backbone's; returns it."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    return module


def to_monai_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a medssl 3-D encoder state dict (timm names, no class token) to `monai_vit`'s names.

    Every key of `monai_vit` but `unused_monai_keys` must then come from `state` (the caller checks the exact key
    sets, e.g. with `medssl.train.checkpoint.load_exact`).
    """
    if "cls_token" in state:
        raise ValueError("a 3-D encoder with a class token does not fit MONAI's ViT: pretrain with "
                         "model.cls_token=false")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new in _RENAMES:
            key = key.replace(old, new) if old.startswith(".") else (new + key[len(old):] if key.startswith(old)
                                                                     else key)
        out[key] = value
    return out


def unused_monai_keys(monai_vit: nn.Module) -> set[str]:
    """The keys of a MONAI ViT (or UNETR's `vit`) that take no part in its forward pass without cross-attention."""
    return {k for k in monai_vit.state_dict() if UNUSED_MONAI_KEYS.fullmatch(k)}
