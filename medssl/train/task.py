"""What a task gives the one training loop (`medssl.train.Engine`).

A task owns a `model` (the module the engine wraps for DDP / DeepSpeed, optimises and checkpoints) and says
how a batch becomes losses. Everything else is an optional hook:

- `losses(model, batch)`: a dict of scalar tensors; its ``"loss"`` entry is minimised (the sum of all entries
  when there is none); every entry is logged. `model` is the wrapped model: call it (not `self.model`) so that
  DDP sees the forward pass.
- `param_groups(weight_decay)`: AdamW groups (``lr_scale`` per group multiplies the scheduled lr).
- `on_epoch_start(engine, epoch)`, `after_step(engine)`: e.g. selective retraining, the EMA teacher.
- `evaluate(engine, epoch)`: metrics on the whole validation set, identical on every rank; the engine keeps
  the best by `TrainConfig.select` and calls `on_best(engine, epoch, metrics)`.
- `extra_state()` / `load_extra_state(state)`: non-module state that an exact resume needs.

Example:
    >>> class Regression(Task):  # doctest: +SKIP
    ...     def losses(self, model, batch):
    ...         x, y = batch
    ...         return {"loss": F.mse_loss(model(x), y)}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from medssl.train.dist import DistInfo
from medssl.train.optim import param_groups

__all__ = ["EngineView", "Task", "move_batch"]


class EngineView(Protocol):
    """What a task's hooks may read from the engine that calls them (`medssl.train.Engine` is one).

    Declared here so that this module needs nothing from the engine (which imports it).
    """

    step: int  # optimizer steps done
    cfg: Any  # the run's `TrainConfig`
    dist: DistInfo
    out_dir: Path | None
    best: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def module(self) -> nn.Module: ...

    def autocast(self) -> AbstractContextManager: ...


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a (nested tuple / list / dict) batch to `device`; floating tensors to `dtype` if given."""
    if torch.is_tensor(batch):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device, dtype, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


class Task(ABC):
    """Base task: `model` plus the hooks above (all but `losses` optional)."""

    find_unused_parameters = False  # DDP: True when some trained modules sit out some steps

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abstractmethod
    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Scalar losses of one micro-batch; ``"loss"`` (or the sum of all entries) is minimised."""

    def prepare(self, batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """Move a batch to the device (floating tensors in the input dtype, which DeepSpeed bf16 needs)."""
        return move_batch(batch, device, None if dtype == torch.float32 else dtype)

    def batch_size(self, batch: Any) -> int:
        """Samples in a micro-batch (for images/s): the length of the batch or of its first element."""
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return len(first)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups; default: no weight decay on 1-D parameters and biases."""
        return param_groups(self.model, weight_decay)

    def on_epoch_start(self, engine: EngineView, epoch: int) -> None:
        """Called before the first step of every epoch (not again when resuming inside an epoch)."""
        return None

    def after_step(self, engine: EngineView) -> None:
        """Called after every optimizer step."""
        return None

    def evaluate(self, engine: EngineView, epoch: int) -> dict[str, float] | None:
        """Validation metrics after an epoch (every rank must return the same dict), or None."""
        return None

    def on_best(self, engine: EngineView, epoch: int, metrics: dict[str, float]) -> None:
        """Called when `metrics[select]` improves (on every rank; write files on rank 0 only)."""
        return None

    def epoch_record(self, engine: EngineView, epoch: int) -> dict[str, Any]:
        """Entries added to the epoch's history record (e.g. counts the task kept during the epoch)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Non-module state saved in every checkpoint (tensors and plain containers)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""
        return None
