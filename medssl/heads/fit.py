"""A compact supervised train / evaluate loop shared by the transfer recipes and the benchmarks.

AdamW, per-iteration linear warmup + half-cycle cosine, optional bf16 autocast, seeded, and the
weights of the best validation epoch restored at the end ("early best on val"). Heads marked
`cacheable` (frozen-encoder probes with `features()` and `head`) are trained on features computed
once, which makes probes cheap on CPU.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from medssl.train.optim import cosine_lr, make_adamw
from medssl.train.optim import param_groups as make_param_groups


@dataclass
class FitConfig:
    """Settings of `fit`.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step.
        lr: peak learning rate (before any per-group `lr_scale`).
        min_lr: floor of the cosine schedule.
        weight_decay: AdamW weight decay (used when `fit` builds the groups itself).
        warmup_epochs: linear warmup length (may be fractional).
        betas: AdamW betas.
        grad_clip: max gradient norm (None = off).
        bf16: autocast to bfloat16 (CUDA or CPU).
        seed: seeds python, numpy and torch.
        eval_every: validate every this many epochs (and after the last).
        device: "cpu", "cuda", ... (default: cuda if available).
        num_workers: DataLoader workers.
    """

    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    bf16: bool = False
    seed: int = 0
    eval_every: int = 1
    device: str | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.eval_every < 1:
            raise ValueError(f"FitConfig needs epochs, batch_size, eval_every >= 1, lr > 0: {asdict(self)}")


@dataclass
class FitResult:
    """What `fit` returns: best validation score, its epoch, per-epoch history, seconds taken."""

    best_score: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator for samplers and loaders."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _device(cfg: FitConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class _Batches:
    """Mini-batches of a dataset: direct tensor indexing for an in-memory `TensorDataset` (no per-sample
    collate, which dominates small CPU runs), a DataLoader otherwise. Re-iterable, one pass per epoch."""

    def __init__(self, data: Dataset, batch_size: int, shuffle: bool = False, sampler: Sampler | None = None,
                 generator: torch.Generator | None = None, drop_last: bool = False, num_workers: int = 0):
        self.data, self.bs, self.shuffle, self.sampler = data, batch_size, shuffle, sampler
        self.gen, self.drop_last, self.workers = generator, drop_last, num_workers
        self.fast = isinstance(data, TensorDataset) and num_workers == 0

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.data)
        return n // self.bs if self.drop_last else math.ceil(n / self.bs)

    def __iter__(self):
        if not self.fast:
            yield from DataLoader(self.data, batch_size=self.bs, shuffle=self.shuffle, sampler=self.sampler,
                                  generator=self.gen, drop_last=self.drop_last, num_workers=self.workers)
            return
        n = len(self.data)
        if self.sampler is not None:
            order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        else:
            order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        for i in range(0, len(self) * self.bs, self.bs):
            idx = order[i:i + self.bs]
            yield tuple(t[idx] for t in self.data.tensors)


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, batch_size: int = 64, device: str | torch.device | None = None,
            bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` over a dataset of (input, target) pairs.

    Returns:
        (outputs concatenated on dim 0 as float32 CPU tensors, targets concatenated).
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    outs, tgts = [], []
    for x, y in _Batches(data, batch_size):
        with _autocast(dev, bf16):
            outs.append(model(x.to(dev)).float().cpu())
        tgts.append(y)
    return torch.cat(outs), torch.cat(tgts)


@torch.no_grad()
def _cache_features(model: nn.Module, data: Dataset, batch_size: int, dev: torch.device) -> TensorDataset:
    model.eval()
    feats, tgts = [], []
    for x, y in _Batches(data, batch_size):
        feats.append(model.features(x.to(dev)).float())
        tgts.append(y.to(dev))
    return TensorDataset(torch.cat(feats), torch.cat(tgts))


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset | None, loss_fn: Callable[..., torch.Tensor],
        score_fn: Callable[[torch.Tensor, torch.Tensor], float], cfg: FitConfig,
        param_groups: list[dict] | None = None, sampler: Sampler | None = None,
        augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        log: Callable[[str], None] | None = None) -> FitResult:
    """Train `model` and keep the weights of the best validation score (higher is better).

    Args:
        model: the network; a `cacheable` probe trains its `head` on precomputed `features()`.
        train_set: dataset of (input [C, H, W], target) pairs.
        val_set: dataset for model selection; None keeps the last epoch.
        loss_fn: loss(outputs, targets) -> scalar.
        score_fn: score(outputs, targets) -> float on the whole validation set, higher is better.
        cfg: schedule and optimiser settings.
        param_groups: AdamW groups (e.g. `layer_decay_groups`); entries may carry `lr_scale`.
            Default: all trainable parameters, no weight decay on 1-D parameters.
        sampler: e.g. `balanced_sampler` (replaces shuffling).
        augment: batch transform (inputs, targets) -> (inputs, targets), training only; not applied
            to cached probe features.
        log: callable for one line per evaluation.

    Returns:
        FitResult; `model` holds the best weights on return.
    """
    t0 = time.time()
    gen = seed_everything(cfg.seed)
    dev = _device(cfg)
    model.to(dev)
    cached = bool(getattr(model, "cacheable", False))
    trained = model.head if cached else model
    if cached:
        train_set = _cache_features(model, train_set, cfg.batch_size, dev)
        val_data = _cache_features(model, val_set, cfg.batch_size, dev) if val_set is not None else None
        augment = None
    else:
        val_data = val_set
    if param_groups is None:
        param_groups = make_param_groups(trained, cfg.weight_decay)
    if not any(g["params"] for g in param_groups):
        raise ValueError("fit: the model has no trainable parameters")
    for g in param_groups:
        g.setdefault("lr_scale", 1.0)
    opt = make_adamw(param_groups, lr=cfg.lr, betas=cfg.betas)
    n = len(train_set)
    loader = _Batches(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=gen, num_workers=0 if cached else cfg.num_workers,
                      drop_last=n > cfg.batch_size and n % cfg.batch_size == 1)  # no BatchNorm on 1 sample
    steps_per_epoch = max(1, len(loader))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    best = FitResult(best_score=-math.inf, best_epoch=-1)
    best_state: dict[str, Any] | None = None
    step = 0
    for epoch in range(cfg.epochs):
        trained.train()
        running = 0.0
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            if augment is not None:
                x, y = augment(x, y)
            lr = cosine_lr(step, total, warmup, cfg.lr, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            with _autocast(dev, cfg.bf16):
                loss = loss_fn(trained(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fit: loss became {loss.item()} at epoch {epoch}, step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_([p for g in param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            running += loss.item()
            step += 1
        last = epoch == cfg.epochs - 1
        if val_data is None or ((epoch + 1) % cfg.eval_every and not last):
            continue
        out, tgt = predict(trained, val_data, cfg.batch_size, dev, cfg.bf16)
        score = float(score_fn(out, tgt.cpu()))
        best.history.append({"epoch": epoch, "loss": running / steps_per_epoch, "val": score})
        if log:
            log(f"epoch {epoch}: loss {running / steps_per_epoch:.4f} val {score:.4f}")
        if score > best.best_score or best_state is None:
            best.best_score, best.best_epoch = score, epoch
            best_state = copy.deepcopy(trained.state_dict())
    if best_state is not None:
        trained.load_state_dict(best_state)
    else:
        best.best_epoch = cfg.epochs - 1
    best.seconds = time.time() - t0
    return best


def random_hflip(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip half of a batch left-right; masks ([N, H, W] targets) are flipped with their images."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5  # [N]
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)  # [N, C, H, W]
    if y.ndim == 3:
        y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)  # [N, H, W]
    return x, y


def auc_score(out: torch.Tensor, tgt: torch.Tensor) -> float:
    """Validation score for classification: macro AUC of the softmax, ties broken by accuracy."""
    from medssl.metrics.classification import roc_auc

    auc = roc_auc(tgt.numpy(), out.float().softmax(1).numpy())[0]
    acc = float((out.argmax(1) == tgt).float().mean())
    return acc if math.isnan(auc) else auc + 1e-3 * acc


def dice_score(num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Validation score for segmentation: mean foreground Dice of the argmax over the whole set."""
    from medssl.metrics.segmentation import SegmentationMeter

    def score(out: torch.Tensor, tgt: torch.Tensor) -> float:
        meter = SegmentationMeter(num_classes)
        meter.update(out.argmax(1), tgt)
        return meter.report()["dice"]

    return score
