"""Supervised heads (classification, segmentation: probe, fine-tune, scratch) as a task of the one engine.

`SupervisedTask` is the task; `train_supervised` runs it on `medssl.train.Engine` under any launcher, with
checkpoints and exact `--resume` when given a run folder; `fit` is the in-process form the benchmarks use.
AdamW, per-iteration linear warmup + half-cycle cosine, the run's precision, seeded, and the weights of the
best validation epoch restored at the end ("early best on val"). Heads marked `cacheable` (frozen-encoder
probes with `features()` and `head`) are trained on features computed once (`medssl.heads.features`), or on
features the caller computed before (a `FeatureCache` shared by several runs), which makes probes cheap on CPU.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from medssl.config import renamed_key
from medssl.data.epochs import EpochBatches, ordered_batches
from medssl.heads.features import frozen_features
from medssl.train.checkpoint import save_checkpoint
from medssl.train.dist import DistInfo, resolve_device
from medssl.train.engine import Engine, TrainConfig
from medssl.train.optim import param_groups as make_param_groups
from medssl.train.task import Task
from medssl.utils import seed_everything


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
        clip_grad: max gradient norm (None = off).
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto`` (see `medssl.train.TrainConfig`).
        seed: seeds python, numpy and torch.
        eval_every: validate every this many epochs (and after the last).
        device: "cpu", "cuda", ... (default: cuda if available).
        num_workers: DataLoader workers.
        grad_clip / bf16: the old names of `clip_grad` / `precision` (``bf16=True`` is ``precision="bf16"``),
            read with a DeprecationWarning.
    """

    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    precision: str = "fp32"
    seed: int = 0
    eval_every: int = 1
    device: str | None = None
    num_workers: int = 0
    grad_clip: InitVar[float | None] = None  # deprecated: clip_grad
    bf16: InitVar[bool | None] = None  # deprecated: precision

    def __post_init__(self, grad_clip: float | None, bf16: bool | None) -> None:
        for old, value in (("grad_clip", grad_clip), ("bf16", bf16)):
            if value is not None:
                new, value = renamed_key(old, value, "FitConfig")
                setattr(self, new, value)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.eval_every < 1:
            raise ValueError(f"FitConfig needs epochs, batch_size, eval_every >= 1, lr > 0: {asdict(self)}")


@dataclass
class FitResult:
    """What `fit` returns: best validation score, its epoch, per-epoch history, seconds taken."""

    best_score: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    engine: Any = None  # the Engine that trained (world size, global batch, images/s, data wait)


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
    dtype = next(model.parameters()).dtype  # bf16 under DeepSpeed bf16
    for x, y in ordered_batches(data, batch_size):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            outs.append(model(x.to(dev, dtype)).float().cpu())
        tgts.append(y)
    return torch.cat(outs), torch.cat(tgts)


class SupervisedTask(Task):
    """(input, target) batches -> `loss_fn(model(x), y)`; evaluation = `score_fn` on the whole validation set.

    Args:
        model: the trained module (a probe's head when features are cached).
        loss_fn: loss(outputs, targets) -> scalar.
        score_fn: score(outputs, targets) -> float, higher is better.
        val_data: validation dataset (None: no evaluation, the last weights are kept).
        batch_size: evaluation batch.
        augment: batch transform (inputs, targets) -> (inputs, targets), training only.
        groups: AdamW groups (default: no decay on 1-D parameters).
        best_path: where rank 0 writes the best weights (`save_checkpoint`), if anywhere.
        best_extra: entries stored beside the weights in `best_path` (architecture record, classes, ...).
    """

    find_unused_parameters = True  # heads read some blocks only (the ViT's own final norm, later blocks)

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor],
                 score_fn: Callable[[torch.Tensor, torch.Tensor], float], val_data: Dataset | None, batch_size: int,
                 augment: Callable | None = None, groups: list[dict] | None = None, best_path: Path | None = None,
                 best_extra: dict[str, Any] | None = None) -> None:
        super().__init__(model)
        self.loss_fn, self.score_fn, self.val_data, self.bs = loss_fn, score_fn, val_data, batch_size
        self.augment, self.groups = augment, groups
        self.best_path, self.best_extra = best_path, best_extra or {}
        self.best_state: dict[str, torch.Tensor] | None = None

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        if self.augment is not None:
            x, y = self.augment(x, y)
        loss = self.loss_fn(model(x), y)
        return {"loss": loss}

    def param_groups(self, weight_decay: float) -> list[dict]:
        groups = self.groups if self.groups is not None else make_param_groups(self.model, weight_decay)
        if not any(g["params"] for g in groups):
            raise ValueError("fit: the model has no trainable parameters")
        return groups

    def evaluate(self, engine: Engine, epoch: int) -> dict[str, float] | None:
        if self.val_data is None:
            return None
        bf16 = engine.cfg.precision == "bf16" and engine.cfg.eval_precision == "train"  # fp32 unless asked
        out, tgt = predict(self.model, self.val_data, self.bs, engine.dist.device, bf16)
        return {"score": float(self.score_fn(out, tgt.cpu()))}

    def on_best(self, engine: Engine, epoch: int, metrics: dict[str, float]) -> None:
        self.best_state = copy.deepcopy(self.model.state_dict())
        if self.best_path is not None and engine.dist.is_main:
            save_checkpoint(self.best_path, {"model": self.best_state, "epoch": epoch, "metrics": dict(metrics),
                                             **self.best_extra})

    def extra_state(self) -> dict[str, Any]:
        return {"best_state": self.best_state}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.best_state = state.get("best_state")


def train_supervised(model: nn.Module, train_set: Dataset | None, val_set: Dataset | None,
                     loss_fn: Callable[..., torch.Tensor], score_fn: Callable[[torch.Tensor, torch.Tensor], float],
                     cfg: FitConfig, param_groups: list[dict] | None = None, sampler: Sampler | None = None,
                     augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                     dist: DistInfo | None = None, out_dir: str | Path | None = None, resume: bool = False,
                     ds_config: dict | None = None, best_extra: dict[str, Any] | None = None,
                     features: tuple[Dataset, Dataset | None] | None = None) -> FitResult:
    """Train `model` on the engine and keep the weights of the best validation score (higher is better).

    Args:
        model: the network; a `cacheable` probe trains its `head` on precomputed `features()`.
        train_set: dataset of (input [C, H, W], target) pairs; each rank reads its own share.
        val_set: dataset for model selection; None keeps the last epoch.
        loss_fn: loss(outputs, targets) -> scalar.
        score_fn: score(outputs, targets) -> float on the whole validation set, higher is better.
        cfg: schedule and optimiser settings (`batch_size` per rank).
        param_groups: AdamW groups (e.g. `layer_decay_groups`); entries may carry `lr_scale`.
        sampler: a `WeightedRandomSampler` (e.g. `balanced_sampler`): draws with replacement by its weights.
        augment: batch transform, training only; not applied to cached probe features.
        dist: launcher (default: one process on `cfg.device`).
        out_dir: run folder for checkpoints, `metrics.csv` and `best.pt` (None: nothing written).
        resume: continue from the newest checkpoint in `out_dir`.
        ds_config: DeepSpeed config when `dist` is DeepSpeed.
        best_extra: entries stored beside the best weights in `out_dir/best.pt`.
        features: a `cacheable` model's precomputed (train, val) `features()` datasets (e.g. entries of a
            `medssl.heads.features.FeatureCache`): its head trains on them, `train_set` / `val_set` are not read.

    Returns:
        FitResult; `model` holds the best weights on return.
    """
    t0 = time.time()
    gen = seed_everything(cfg.seed)
    dist = dist or DistInfo(device=resolve_device(cfg.device))
    model.to(dist.device)
    cached = bool(getattr(model, "cacheable", False))
    if features is not None and not cached:
        raise ValueError(f"fit: features are given, but {type(model).__name__} is not a cacheable probe")
    if features is None and train_set is None:
        raise ValueError("fit: no train_set (and no precomputed features)")
    trained = model.head if cached else model
    if cached:
        train_set, val_set = features or (
            frozen_features(model, train_set, cfg.batch_size, dist.device),
            frozen_features(model, val_set, cfg.batch_size, dist.device) if val_set is not None else None)
        augment = None
    weights = num = None
    if sampler is not None:
        weights, num = getattr(sampler, "weights", None), getattr(sampler, "num_samples", None)
        if weights is None:
            raise ValueError("fit: sampler must be a WeightedRandomSampler (weights and num_samples)")
    per_rank = math.ceil((num or len(train_set)) / dist.world_size)
    data = EpochBatches(train_set, cfg.batch_size, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
                        rank=dist.rank, world_size=dist.world_size, shuffle=True,
                        drop_last=per_rank > cfg.batch_size and per_rank % cfg.batch_size == 1,  # no BN on 1 sample
                        workers=0 if cached else cfg.num_workers, weights=weights, num_samples=num)
    spe = len(data)
    out = Path(out_dir) if out_dir is not None else None
    task = SupervisedTask(trained, loss_fn, score_fn, val_set, cfg.batch_size, augment, param_groups,
                          best_path=out / "best.pt" if out is not None else None, best_extra=best_extra)
    tc = TrainConfig(total_steps=cfg.epochs * spe, lr=cfg.lr, warmup_steps=int(cfg.warmup_epochs * spe),
                     min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                     clip_grad=cfg.clip_grad, precision=cfg.precision,
                     log_every=max(1, spe), ckpt_every=0, seed=cfg.seed, steps_per_epoch=spe,
                     eval_every=cfg.eval_every, select="score" if val_set is not None else None, max_bad_steps=1)
    engine = Engine(task, tc, out, dist, ds_config=ds_config, micro_batch_size=cfg.batch_size)
    if resume:
        engine.resume()
    engine.fit(data)
    if task.best_state is not None:
        trained.load_state_dict(task.best_state)
    history = [{"epoch": h["epoch"], "loss": h.get("loss", float("nan")), "val": h["val"]["score"]}
               for h in engine.history if "val" in h]
    best_epoch = engine.best["epoch"] if engine.best["epoch"] is not None else cfg.epochs - 1
    return FitResult(best_score=engine.best["score"], best_epoch=best_epoch, history=history,
                     seconds=time.time() - t0, engine=engine)


def fit(model: nn.Module, train_set: Dataset | None, val_set: Dataset | None, loss_fn: Callable[..., torch.Tensor],
        score_fn: Callable[[torch.Tensor, torch.Tensor], float], cfg: FitConfig,
        param_groups: list[dict] | None = None, sampler: Sampler | None = None,
        augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        log: Callable[[str], None] | None = None, features: tuple[Dataset, Dataset | None] | None = None
        ) -> FitResult:
    """In-process `train_supervised` (one device, no files): what the benchmarks call.

    `log`, if given, receives one line per evaluation; `features`: precomputed probe features (`train_supervised`).
    """
    res = train_supervised(model, train_set, val_set, loss_fn, score_fn, cfg, param_groups, sampler, augment,
                           features=features)
    if log:
        for h in res.history:
            log(f"epoch {h['epoch']}: loss {h['loss']:.4f} val {h['val']:.4f}")
    return res


def random_hflip(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip half of a batch left-right (the last axis); masks ([N, H, W] or [N, D, H, W] targets, one axis fewer
    than the images) are flipped with their images."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5  # [N]
    x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)  # [N, C, H, W] / [N, C, D, H, W]
    if y.ndim == x.ndim - 1:
        y = torch.where(flip.view(-1, *[1] * (y.ndim - 1)), y.flip(-1), y)  # [N, H, W] / [N, D, H, W]
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
