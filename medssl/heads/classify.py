"""Classification on ViT backbones: MAE linear probe, multi-block probe, full fine-tuning.

- `LinearProbe`: frozen encoder; features = cls token (or mean of patch tokens) of the last block
  after the backbone's final norm, then BatchNorm1d(affine=False, eps=1e-6) and a Linear layer
  (weights normal std 0.01, bias 0), as in MAE's `main_linprobe.py`. With `num_blocks=k > 1` it is a
  multi-block probe: the pooled tokens of the last k blocks (inner blocks through a parameter-free
  LayerNorm) are concatenated before the BatchNorm, which reads more than the last layer's features
  and helps in the low-label regime.
- `FineTuneClassifier`: the whole backbone trains; mean of the last block's patch tokens, LayerNorm
  (fc_norm, eps 1e-6), Linear head (std 2e-5); use `layer_decay_groups` for layer-wise lr decay
  (FACTS.md: id 0 for cls/pos/patch_embed, i + 1 for blocks.i, depth + 1 for the rest;
  scale = decay ** (depth + 1 - id)).
- `class_weights` / `balanced_sampler` counter class imbalance.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import WeightedRandomSampler

from medssl.heads.tokens import block_tokens, check_vit, freeze, plain_norm, probe_head, resolve_blocks, set_drop_path

POOLS = ("cls", "mean", "cls+mean")


def _pool(patch: torch.Tensor, prefix: torch.Tensor, pool: str) -> torch.Tensor:
    if pool in ("cls", "cls+mean") and prefix.shape[1] == 0:
        raise ValueError(f"pool={pool!r} needs a class token, but the backbone has none; use pool='mean'")
    if pool == "cls":
        return prefix[:, 0]  # [N, D]
    if pool == "mean":
        return patch.mean(dim=1)  # [N, D]
    return torch.cat([prefix[:, 0], patch.mean(dim=1)], dim=-1)  # [N, 2D]


class LinearProbe(nn.Module):
    """Frozen ViT + BatchNorm1d(affine=False) + Linear; `num_blocks > 1` gives the multi-block probe.

    Args:
        backbone: timm VisionTransformer (frozen here).
        num_classes: output classes.
        pool: "cls", "mean" or "cls+mean".
        num_blocks: read the last k blocks (1 = MAE's linear probe).

    Example:
        >>> probe = LinearProbe(vit, num_classes=2, num_blocks=4)  # doctest: +SKIP
        >>> logits = probe(images)  # [N, 2]
    """

    cacheable = True  # features do not change while training: `fit` may precompute them

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str = "cls", num_blocks: int = 1):
        super().__init__()
        depth = check_vit(backbone)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = freeze(backbone)
        self.pool, self.indices = pool, resolve_blocks(depth, num_blocks)
        dim = backbone.embed_dim * len(self.indices) * (2 if pool == "cls+mean" else 1)
        self.head = probe_head(dim, num_classes)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # the encoder stays frozen (no dropout / drop path, no BN updates)
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] images -> [N, F] probe features."""
        pairs = block_tokens(self.backbone, x, self.indices)
        feats = []
        for j, (patch, prefix) in enumerate(pairs):
            last = j == len(pairs) - 1
            tokens = torch.cat([prefix, patch], dim=1)  # [N, P + L, D]
            tokens = self.backbone.norm(tokens) if last else plain_norm(tokens)
            p = prefix.shape[1]
            feats.append(_pool(tokens[:, p:], tokens[:, :p], self.pool))
        return torch.cat(feats, dim=-1)  # [N, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [N, num_classes]


class FineTuneClassifier(nn.Module):
    """ViT fine-tuning head: mean-pooled patch tokens -> fc_norm -> Linear (std 2e-5).

    Args:
        backbone: timm VisionTransformer; all of it is trained.
        num_classes: output classes.
        drop_path_rate: if given, reset the backbone's stochastic depth (linear over blocks).
        pool: "mean" (MAE fine-tuning default) or "cls".
    """

    def __init__(self, backbone: nn.Module, num_classes: int, drop_path_rate: float | None = None,
                 pool: str = "mean"):
        super().__init__()
        check_vit(backbone)
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if drop_path_rate is not None:
            set_drop_path(backbone, drop_path_rate)
        self.backbone, self.pool = backbone, pool
        self.last = [len(backbone.blocks) - 1]
        self.fc_norm = nn.LayerNorm(backbone.embed_dim, eps=1e-6)
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch, prefix = block_tokens(self.backbone, x, self.last)[0]  # [N, L, D], [N, P, D]
        pooled = _pool(patch, prefix, self.pool)  # [N, D]
        return self.head(self.fc_norm(pooled))  # [N, num_classes]


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
# embeddings (layer 0); MONAI's ViT (a 3-D backbone, UNETR's encoder) names them patch_embedding(.position_embeddings)
_EMBED = re.compile(r"(?:^|\.)(cls_token|reg_token|pos_embed|patch_embed|patch_embedding|mask_token)(?:\.|$)")
_TOKENS = re.compile(r"(?:^|\.)(cls_token|reg_token|pos_embed|position_embeddings|mask_token)(?:\.|$)")  # no decay


def layer_id(name: str, depth: int) -> int:
    """MAE layer id of a parameter name: 0 embeddings, i + 1 for blocks.i, depth + 1 otherwise.

    Example:
        >>> layer_id("backbone.blocks.3.attn.qkv.weight", 12), layer_id("head.weight", 12)
        (4, 13)
    """
    if _EMBED.search(name):
        return 0
    m = _BLOCK.search(name)
    return int(m.group(1)) + 1 if m else depth + 1


def layer_decay_groups(model: nn.Module, depth: int, lr: float, weight_decay: float,
                       layer_decay: float = 1.0, skip: Sequence[str] = ()) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay; no weight decay on 1-D params and tokens.

    Built by `medssl.train.optim.param_groups` with the MAE layer ids of `layer_id` and
    `num_layers = depth + 1`. Each group carries `lr_scale` (a scheduler sets
    `group["lr"] = base * group["lr_scale"]`) and starts at `lr * lr_scale`. Frozen parameters are skipped.

    Args:
        model: the module to optimise (parameter names may carry prefixes, e.g. "backbone.").
        depth: number of ViT blocks.
        lr: base learning rate.
        weight_decay: decay for >= 2-D weights.
        layer_decay: decay factor per layer (1.0 = none; MAE ViT-B uses 0.65-0.75).
        skip: extra parameter names exempt from weight decay.
    """
    from medssl.train.optim import param_groups

    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    tokens = [n for n, _ in model.named_parameters() if _TOKENS.search(n)]
    groups = param_groups(model, weight_decay, no_weight_decay=[*tokens, *skip],
                          layer_id=lambda n: layer_id(n, depth), layer_decay=layer_decay, num_layers=depth + 1)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights, normalised to mean 1 over present classes (absent: 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if counts.shape[0] != num_classes:
        raise ValueError(f"labels hold classes >= num_classes={num_classes}")
    w = np.zeros(num_classes)
    present = counts > 0
    w[present] = 1.0 / counts[present]
    w *= present.sum() / w.sum()
    return torch.tensor(w, dtype=torch.float32)


def balanced_sampler(labels: Sequence[int] | np.ndarray, generator: torch.Generator | None = None
                     ) -> WeightedRandomSampler:
    """Sampler drawing each class equally often (with replacement), one epoch = len(labels) draws."""
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y)
    w = 1.0 / counts[y]
    return WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), num_samples=len(y),
                                 replacement=True, generator=generator)
