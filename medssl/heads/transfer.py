"""The one skeleton of the transfer recipes (classification, segmentation): a head on a backbone, trained on
the train split with model selection on val, then written with its test report.

A recipe reads its data into three (images, targets) splits and makes the head's record; `start_transfer`
writes the resolved config, `train_transfer` builds the head, loads the pretrained backbone once (not when
resuming), normalises the images as the backbone was pretrained and trains it (layer-wise lr decay unless the
protocol is ``probe``); the recipe then scores the test split and `finish_transfer` writes ``metrics.json``
and ``head.pt`` (``medssl.heads.build.HEAD_FILE``: the record and every weight, from which
`medssl.heads.build.load_head` rebuilds the model alone).

Example:
    >>> out = start_transfer(cfg, dist)  # doctest: +SKIP
    >>> run = train_transfer(cfg, record, splits, loss_fn, score_fn, dist, ds_config, resume)  # doctest: +SKIP
    >>> finish_transfer(run, {"test": ...}, dist)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Sampler, TensorDataset

from medssl.config import dump_config
from medssl.heads.build import HEAD_FILE, build_head, init_head, save_head
from medssl.heads.classify import layer_decay_groups
from medssl.heads.fit import FitConfig, FitResult, train_supervised
from medssl.train.dist import DistInfo
from medssl.utils import seed_everything

__all__ = ["TransferRun", "finish_transfer", "start_transfer", "train_transfer"]



@dataclass
class TransferRun:
    """What `train_transfer` gives back: the trained model, its record, the normalised splits, the fit."""

    out: Path
    model: nn.Module
    record: dict[str, Any]
    sets: dict[str, TensorDataset]
    fit: FitResult
    fit_config: FitConfig


def start_transfer(cfg: Mapping[str, Any], dist: DistInfo) -> Path:
    """The run folder ``output.dir``, with the resolved config written to it (by rank 0)."""
    out = Path(cfg["output"]["dir"])
    if dist.is_main:
        dump_config(cfg, out / "config.yaml")
    return out


def train_transfer(cfg: Mapping[str, Any], record: dict[str, Any],
                   splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]], loss_fn: Callable[..., torch.Tensor],
                   score_fn: Callable[[torch.Tensor, torch.Tensor], float],
                   dist: DistInfo, ds_config: dict | None, resume: bool, *, sampler: Sampler | None = None,
                   augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                   best_extra: dict[str, Any] | None = None) -> TransferRun:
    """Build the head of `record`, init its backbone, train it on ``splits["train"]``, select on ``"val"``.

    Args:
        cfg: the recipe config (``model.protocol``, ``model.layer_decay``, ``train.*``, ``output.dir``).
        splits: ``train`` / ``val`` / ``test``: (images ``[N, C, H, W]`` in [0, 1], targets).
        sampler / augment / best_extra: passed to `train_supervised`.
    """
    m, t = cfg["model"], cfg["train"]
    out = Path(cfg["output"]["dir"])
    seed_everything(t["seed"])  # the fresh head: the same in every process and every restart
    model = build_head(record)
    if not (resume and any((out / "checkpoints").glob("*"))):
        init_head(model, record)  # the pretrained weights, once; a resumed run has them in its checkpoint
    norm = model.backbone.medssl_cfg
    mean, std = (torch.tensor(norm[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    sets = {name: TensorDataset((x - mean) / std, y) for name, (x, y) in splits.items()}  # as the pretraining
    groups = None
    if m["protocol"] != "probe":
        groups = layer_decay_groups(model, len(model.backbone.blocks), t["lr"], t["weight_decay"], m["layer_decay"])
    fc = FitConfig(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"],
                   warmup_epochs=t["warmup_epochs"], seed=t["seed"], device=t["device"], precision=t["precision"])
    res = train_supervised(model, sets["train"], sets["val"], loss_fn, score_fn, fc, param_groups=groups,
                           sampler=sampler, augment=augment, dist=dist, out_dir=out, resume=resume,
                           ds_config=ds_config, best_extra=best_extra)
    return TransferRun(out, model, record, sets, res, fc)


def finish_transfer(run: TransferRun, report: dict[str, Any], dist: DistInfo, **extra: Any) -> None:
    """Write ``metrics.json`` (`report`) and :data:`HEAD_FILE` (the record, every weight and `extra`) on rank 0."""
    if dist.is_main:
        (run.out / "metrics.json").write_text(json.dumps(report, indent=1))
        save_head(run.out / HEAD_FILE, run.model, run.record, **extra)
