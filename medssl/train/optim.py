"""AdamW parameter groups and the per-iteration warmup + half-cycle cosine schedule (MAE recipe)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

_FUSED_DEVICES = ("cpu", "cuda")


def param_groups(model: nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = (),
                 layer_id: Callable[[str], int] | None = None, layer_decay: float | None = None,
                 num_layers: int | None = None) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups (no decay on 1-D params, biases, tokens).

    With `layer_id`, `layer_decay` and `num_layers` (the MAE fine-tuning rule), each group also carries
    `lr_scale = layer_decay ** (num_layers - layer_id(name))`; `set_lr` multiplies it in.
    """
    skip = set(no_weight_decay)
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        lid = layer_id(name) if layer_id is not None else 0
        key = (no_decay, lid)
        if key not in groups:
            scale = layer_decay ** (num_layers - lid) if layer_decay is not None and num_layers is not None else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def lr_scale_groups(model: nn.Module, rules: Sequence[tuple[str, Callable[[str], bool], float]],
                    weight_decay: float) -> list[dict]:
    """Groups by name: each trainable parameter joins the first rule `(group name, test(name), lr_scale)` it
    passes, else the group "rest" at scale 1; every group decays by `weight_decay` (the DETR recipe)."""
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key, scale = next(((g, s) for g, test, s in rules if test(name)), ("rest", 1.0))
        groups.setdefault(key, {"params": [], "name": key, "lr_scale": scale, "weight_decay": weight_decay})
        groups[key]["params"].append(p)
    return list(groups.values())


def make_adamw(groups: list[dict] | Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
               weight_decay: float = 0.01) -> torch.optim.AdamW:
    """`torch.optim.AdamW`, with its fused kernel when every parameter is a float tensor on CPU or CUDA.

    The fused kernel applies the same update as the default one in a single pass over the parameters
    (about 3x faster per step on CPU for a ViT-S MAE); anything else falls back to the default.
    """
    # materialise generators (e.g. {"params": model.parameters()}): the check below must not use them up
    groups = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in groups]
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def cosine_lr(step: float, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup to `base_lr` over `warmup_steps`, then half-cycle cosine down to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Set every group's lr to `lr * group['lr_scale']` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The MAE linear scaling rule: lr = base_lr * effective_batch / 256."""
    return base_lr * effective_batch / 256
