"""ViT backbones: timm `VisionTransformer`s (same modules and state-dict names) with a medssl registry.

Example:
    >>> from medssl.models.vit import create_vit
    >>> vit = create_vit("vit_tiny_patch16", img_size=64, in_chans=1)
    >>> vit.forward_features(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 17, 192])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch  # noqa: F401  (used in the docstring example)
from timm.models.vision_transformer import VisionTransformer

from medssl.models.attention import attention_class

# Normalisation for 1-channel images scaled to [0, 1] (LUMID shards); 3-channel uses ImageNet's.
GRAY_MEAN, GRAY_STD = (0.5,), (0.25,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneCfg:
    """Architecture record of a registered ViT, with the input it expects and where it came from."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int = 224
    in_chans: int = 1
    mlp_ratio: float = 4.0
    mean: tuple[float, ...] = GRAY_MEAN
    std: tuple[float, ...] = GRAY_STD
    source: str = "random initialisation"
    extra: dict[str, Any] = field(default_factory=dict)


_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
          "huge": (1280, 32, 16)}

_REGISTRY: dict[str, BackboneCfg] = {}


def register(cfg: BackboneCfg) -> BackboneCfg:
    """Add an architecture to the registry (name must be new)."""
    if cfg.name in _REGISTRY:
        raise ValueError(f"backbone {cfg.name!r} is already registered")
    _REGISTRY[cfg.name] = cfg
    return cfg


for _size, _patches in (("tiny", (16, 8, 4)), ("small", (16, 8, 4)), ("base", (16, 8)), ("large", (16,)),
                        ("huge", (14,))):
    _dim, _depth, _heads = _SIZES[_size]
    for _p in _patches:
        register(BackboneCfg(f"vit_{_size}_patch{_p}", _dim, _depth, _heads, _p,
                             img_size=224 if _p >= 14 else (128 if _p == 8 else 64)))


def list_architectures() -> list[str]:
    """Names of the registered ViT architectures."""
    return sorted(_REGISTRY)


def get_cfg(name: str) -> BackboneCfg:
    """The registry record of `name` (clear error listing the known names otherwise)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone architecture {name!r}; known: {', '.join(list_architectures())}")
    return _REGISTRY[name]


def infer_num_heads(embed_dim: int) -> int:
    """Heads for a width seen in a checkpoint: the registry's choice for that width, else width / 64."""
    for dim, _, heads in _SIZES.values():
        if dim == embed_dim:
            return heads
    return max(1, embed_dim // 64)


def build_vit(embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int | tuple[int, int],
              in_chans: int, mlp_ratio: float = 4.0, attn_impl: str | None = None,
              **timm_kwargs: Any) -> VisionTransformer:
    """A timm VisionTransformer with medssl's attention switch (state-dict names unchanged)."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if any(s < patch_size for s in sizes):
        raise ValueError(f"img_size {sizes} is smaller than one patch ({patch_size} px)")
    timm_kwargs.setdefault("num_classes", 0)
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
        attn_layer=attention_class(attn_impl), **timm_kwargs)


def create_vit(name: str, img_size: int | tuple[int, int] | None = None, in_chans: int | None = None,
               patch_size: int | None = None, attn_impl: str | None = None,
               **timm_kwargs: Any) -> VisionTransformer:
    """Create a registered ViT, e.g. `create_vit("vit_small_patch16", img_size=224, in_chans=1)`.

    Extra keyword arguments go to timm's `VisionTransformer` (num_classes, global_pool, drop_path_rate, ...).
    """
    cfg = get_cfg(name)
    model = build_vit(cfg.embed_dim, cfg.depth, cfg.num_heads, patch_size or cfg.patch_size,
                      img_size or cfg.img_size, in_chans or cfg.in_chans, cfg.mlp_ratio, attn_impl,
                      **timm_kwargs)
    return model
