"""The one training loop of medssl, for plain python, torchrun (DDP) and DeepSpeed.

The engine trains a `medssl.train.Task` (MAE pretraining, a classification / segmentation head, a MedMask
stage) on its data; it knows no task. It owns the optimizer (AdamW, client-side, so DeepSpeed compiles
nothing), the per-iteration lr schedule (warmup + cosine, or a step drop), epochs and their hooks, gradient
accumulation and clipping, mixed precision, the non-finite-step rule all ranks agree on, evaluation and the
best-so-far, logging (CSV / TensorBoard, a progress bar, the share of step time spent waiting for data),
atomic checkpoints and exact resume (model, optimizer, schedule step, scaler, RNG, the task's extra state,
the data position, best-so-far and history; the RNG is also re-derived from (seed, rank, step) at every step
so that a resumed run draws the same masks as an uninterrupted one).

Data is either an `EpochBatches`-like object (`batches(epoch, start)`, `len` = micro-batches per epoch), which
the engine seeks on resume, or a plain iterable that already starts at the resume point (the MAE stream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from medssl.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medssl.train.dist import DistInfo, all_reduce_max, all_reduce_mean, barrier
from medssl.train.logging import ScalarLogger
from medssl.train.optim import cosine_lr, make_adamw, set_lr
from medssl.train.task import Task
from medssl.utils import stable_seed

log = logging.getLogger("medssl")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA with bf16 support and on CPUs with native bf16, fp32 elsewhere.

    Measured on a 2-core AVX2 machine: a tiny-ViT MAE step ran 4x slower under bf16 autocast than in fp32.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


SCHEDULES = ("cosine", "step")


@dataclass
class TrainConfig:
    """Optimisation settings (the lr is the absolute peak, already scaled by the batch).

    Attributes:
        total_steps: optimizer steps of the whole run.
        lr: peak lr (each group's ``lr_scale`` multiplies it).
        warmup_steps / min_lr: linear warmup, then (schedule ``cosine``) half-cycle cosine down to min_lr.
        schedule: ``cosine`` (MAE, fine-tuning) or ``step`` (constant, x0.1 from ``lr_drop_step``: DETR).
        steps_per_epoch: optimizer steps per epoch (None: the run is one epoch); epochs drive the hooks,
            evaluation and the per-epoch checkpoint.
        eval_every: evaluate every this many epochs (and after the last).
        select: metric to keep the best by (higher is better); None: no best tracking.
        eval_precision: ``fp32`` (default): evaluation, and so the choice of the best epoch, runs in float32
            whatever the training precision, as the final scoring of a checkpoint does, so that the epoch kept is
            the one that scores best where it is reported (under bf16 autocast a detector's validation R@0.3
            can differ from its float32 score by a lesion or more); ``train``: under the training precision.
        ckpt_every: also checkpoint every this many steps (epochs always end with one); 0: epochs only.
        keep_checkpoints / keep_every: keep the newest this many checkpoints, plus those of steps that are
            multiples of keep_every (0: none); a step is only there if a checkpoint was written at it (a multiple
            of ckpt_every or an epoch end). Under DeepSpeed every checkpoint is kept (no pruning).
        stop_at: leave after this step (checkpointed), as a time-boxed job; resume later.
        loggers: experiment trackers besides metrics.csv: "mlflow" (local file store), "wandb" (offline).
    """

    total_steps: int
    lr: float
    warmup_steps: int = 0
    min_lr: float = 0.0
    schedule: str = "cosine"
    lr_drop_step: int | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    accum_iter: int = 1
    clip_grad: float | None = None
    precision: str = "auto"
    log_every: int = 10
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    keep_every: int = 0
    seed: int = 0
    max_bad_steps: int = 20
    stop_at: int | None = None
    steps_per_epoch: int | None = None
    eval_every: int = 1
    select: str | None = None
    eval_precision: str = "fp32"
    loggers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.eval_precision not in ("fp32", "train"):
            raise ValueError(f"eval_precision must be fp32 or train, got {self.eval_precision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.total_steps < 1 or self.accum_iter < 1 or self.eval_every < 1:
            raise ValueError("total_steps, accum_iter and eval_every must be >= 1")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        self.betas = tuple(self.betas)
        self.loggers = tuple(self.loggers)
        from medssl.train.trackers import TRACKERS

        bad = sorted(set(self.loggers) - set(TRACKERS))
        if bad:
            raise ValueError(f"unknown loggers {bad}; known: {list(TRACKERS)} (metrics.csv is always written)")

    @property
    def epoch_steps(self) -> int:
        """Optimizer steps per epoch (the whole run when no epochs are set)."""
        return self.steps_per_epoch or self.total_steps

    def lr_at(self, step: int) -> float:
        """The scheduled peak lr at `step`."""
        if self.schedule == "step":
            warm = self.lr * step / self.warmup_steps if step < self.warmup_steps else self.lr
            return warm * (0.1 if self.lr_drop_step is not None and step >= self.lr_drop_step else 1.0)
        return cosine_lr(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr)


Callback = Callable[["Engine", int, Any], None]


class Engine:
    """Trains a task's model under the launcher described by `dist`.

    Args:
        task: the `Task` (its `model` is trained, its `param_groups` give the AdamW groups).
        cfg: `TrainConfig`.
        out_dir: run folder (checkpoints in `out_dir/checkpoints`, `metrics.csv`); None: no files at all.
        dist: from `setup_distributed`.
        ds_config: DeepSpeed JSON config (backend deepspeed).
        micro_batch_size: per-rank micro-batch (DeepSpeed wants it).
    """

    def __init__(self, task: Task, cfg: TrainConfig, out_dir: str | os.PathLike | None, dist: DistInfo,
                 ds_config: dict | None = None, micro_batch_size: int | None = None):
        self.task = task
        model = task.model
        self.cfg, self.dist = cfg, dist
        self.out_dir = Path(out_dir) if out_dir is not None else None
        chosen = resolve_precision(cfg.precision, dist.device)
        if chosen != cfg.precision and dist.is_main:
            log.info("precision auto -> %s on %s", chosen, dist.device)
        cfg.precision = chosen
        self.ckpt_dir = self.out_dir / "checkpoints" if self.out_dir is not None else None
        self.step = 0
        self.bad_steps = 0
        self.best: dict[str, Any] = {"score": -math.inf, "epoch": None, "metrics": None}
        self.history: list[dict[str, Any]] = []
        self.data_wait_fraction: float | None = None
        self.model = model.to(dist.device)
        groups = [{k: v for k, v in g.items() if k != "names"}  # names: not for the optimizer
                  for g in task.param_groups(cfg.weight_decay)]
        if not any(len(list(g["params"])) for g in groups):
            raise ValueError("the model has no trainable parameters")
        self.optimizer = make_adamw(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.scaler = None
        self.ds_engine = None
        if dist.backend == "deepspeed":
            self._init_deepspeed(ds_config or {}, micro_batch_size)
        elif dist.backend == "ddp":
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            unused = bool(task.find_unused_parameters)
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                             find_unused_parameters=unused)
        if cfg.precision == "fp16" and self.ds_engine is None:
            self.scaler = torch.amp.GradScaler(dist.device.type)

    # ------------------------------------------------------------------------------------ set-up
    def _init_deepspeed(self, ds_config: dict, micro_batch_size: int | None) -> None:
        import deepspeed

        cfg = dict(ds_config)
        if "optimizer" in cfg:
            raise ValueError("the DeepSpeed config must not define an optimizer: medssl passes a client-side "
                             "torch AdamW (a config optimizer JIT-compiles a fused Adam for minutes)")
        wanted = {"train_micro_batch_size_per_gpu": micro_batch_size or 1,
                  "gradient_accumulation_steps": self.cfg.accum_iter,
                  "gradient_clipping": float(self.cfg.clip_grad or 0.0)}
        for key, value in wanted.items():  # the run's config decides; a DeepSpeed json that disagrees is an error
            if key in cfg and cfg[key] != "auto" and float(cfg[key]) != float(value):
                raise ValueError(f"DeepSpeed config sets {key}={cfg[key]} but the run config asks for {value}: "
                                 "set it in one place")
            cfg[key] = value
        if self.cfg.precision == "bf16":
            cfg.setdefault("bf16", {"enabled": True})
        if self.cfg.precision == "fp16" and not cfg.get("fp16", {}).get("enabled"):
            raise ValueError("precision fp16 under DeepSpeed needs an enabled 'fp16' section in the DeepSpeed config")
        cfg.pop("train_batch_size", None)
        if cfg.get("fp16", {}).get("enabled") and self.dist.device.type == "cpu":
            raise ValueError("fp16 with DeepSpeed's loss scaler does not update weights on CPU; use bf16 or fp32")
        self.ds_config = cfg
        self.ds_engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                                    config=cfg)
        if cfg.get("bf16", {}).get("enabled"):  # DeepSpeed casts the parameters only: buffers (BatchNorm) follow
            for buf in self.model.buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.to(torch.bfloat16)
        self.model = self.ds_engine

    @property
    def module(self) -> nn.Module:
        """The bare model (no DDP / DeepSpeed wrapper)."""
        m = self.model
        while hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        return m

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype inputs must have: DeepSpeed bf16 casts the parameters, so inputs follow."""
        if self.ds_engine is not None and self.ds_config.get("bf16", {}).get("enabled"):
            return torch.bfloat16
        return torch.float32

    def autocast(self):
        """The run's mixed-precision context (also for evaluation): bf16 / fp16 autocast, or nothing."""
        if self.ds_engine is not None or self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    @property
    def global_batch(self) -> int | None:
        """Samples per optimizer step over all ranks (per-rank micro-batch x ranks x accumulation)."""
        return None if self._micro_batch is None else self._micro_batch * self.dist.world_size * self.cfg.accum_iter

    _micro_batch: int | None = None

    # ------------------------------------------------------------------------------------ checkpoints
    def _client_state(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        return {"step": self.step, "train_config": dataclasses.asdict(self.cfg), **(extra or {}),
                "model_config": dict(getattr(self.module, "config", {}) or {}),
                "best": {k: v for k, v in self.best.items()}, "history": list(self.history),
                "task_state": self.task.extra_state()}

    def save(self, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint the full training state (every rank must call; rank 0 writes for plain/DDP)."""
        if self.ckpt_dir is None:
            return
        client = self._client_state(extra)
        if self.ds_engine is not None:
            self.ds_engine.save_checkpoint(str(self.ckpt_dir), tag=f"step{self.step:08d}", client_state=client)
            return
        if self.dist.is_main:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": {"step": self.step}, "scaler": self.scaler.state_dict() if self.scaler else {},
                     "rng": rng_state(), **client}
            save_checkpoint(checkpoint_path(self.ckpt_dir, self.step), state)
            prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints, self.cfg.keep_every)
        barrier(self.dist)

    def has_checkpoint(self) -> bool:
        """Whether `out_dir/checkpoints` holds a checkpoint to resume from."""
        if self.ckpt_dir is None:
            return False
        if self.ds_engine is not None:
            return (self.ckpt_dir / "latest").is_file()
        return latest_checkpoint(self.ckpt_dir) is not None

    def resume(self) -> int:
        """Continue from the newest checkpoint in `out_dir/checkpoints` if there is one; returns the step."""
        if not self.has_checkpoint():
            return 0
        if self.ds_engine is not None:
            _, client = self.ds_engine.load_checkpoint(str(self.ckpt_dir))
        else:
            client = load_checkpoint(latest_checkpoint(self.ckpt_dir))
            self.module.load_state_dict(client["model"])
            self.optimizer.load_state_dict(client["optimizer"])
            for group in self.optimizer.param_groups:  # the kernel choice is this run's, not the checkpoint's
                group["fused"] = self.optimizer.defaults.get("fused")
            if self.scaler is not None and client.get("scaler"):
                self.scaler.load_state_dict(client["scaler"])
            set_rng_state(client["rng"])
        self.step = int(client["step"])
        self.best = dict(client.get("best") or self.best)
        self.history = list(client.get("history") or [])
        self.task.load_extra_state(client.get("task_state") or {})
        if self.dist.is_main:
            log.info("resumed from %s at step %d", self.ckpt_dir, self.step)
        return self.step

    # ------------------------------------------------------------------------------------ training
    def _losses(self, batch: Any) -> dict[str, torch.Tensor]:
        out = self.task.losses(self.model, batch)
        if "loss" not in out:
            out = {"loss": sum(out.values()), **out}
        return out

    def _micro_step(self, batch: Any, sync: bool) -> dict[str, float]:
        if self.ds_engine is not None:
            out = self._losses(batch)
            self.ds_engine.backward(out["loss"])
            self.ds_engine.step()
        else:
            no_sync = self.model.no_sync if (self.dist.backend == "ddp" and not sync) else contextlib.nullcontext
            with no_sync():
                with self.autocast():
                    out = self._losses(batch)
                scaled = out["loss"] / self.cfg.accum_iter
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return {k: float(v.detach()) for k, v in out.items()}

    def _optimizer_step(self) -> float | None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.cfg.clip_grad:
            norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.clip_grad))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _evaluate(self, epoch: int) -> dict[str, Any] | None:
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad(), (self.autocast() if self.cfg.eval_precision == "train" else contextlib.nullcontext()):
            metrics = self.task.evaluate(self, epoch)
        self.module.train(was_training)
        if metrics and self.cfg.select:
            if self.cfg.select not in metrics:
                raise KeyError(f"evaluation gave {sorted(metrics)}, not the selection metric {self.cfg.select!r}")
            score = float(metrics[self.cfg.select])
            if score > self.best["score"] or self.best["epoch"] is None:
                self.best = {"score": score, "epoch": epoch, "metrics": dict(metrics)}
                self.task.on_best(self, epoch, metrics)
        return metrics

    def fit(self, data: Any, callbacks: Sequence[Callback] = (),
            on_checkpoint: Callable[[], dict[str, Any]] | None = None) -> list[float]:
        """Train from `self.step` to `cfg.total_steps` (or `stop_at`); returns the per-step mean losses of this call.

        Args:
            data: an object with `batches(epoch, start)` and `len()` micro-batches per epoch (sought on resume),
                or an iterable that already starts at the resume point (a stream).
            callbacks: `cb(engine, step, batch)` after every step.
            on_checkpoint: extra entries for every checkpoint.
        """
        cfg, spe = self.cfg, self.cfg.epoch_steps
        batches_of = self._batch_source(data)
        logger = ScalarLogger(self.out_dir, enabled=self.dist.is_main, resume_step=self.step,
                              trackers=cfg.loggers) if self.out_dir else None
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True,
                   desc="train", mininterval=2.0)
        meter = _Meter()
        it = None
        self.model.train()
        end = min(cfg.total_steps, cfg.stop_at) if cfg.stop_at else cfg.total_steps
        while self.step < end:
            epoch, in_epoch = divmod(self.step, spe)
            if it is None or in_epoch == 0:
                if in_epoch == 0:
                    self.task.on_epoch_start(self, epoch)
                    self.model.train()
                it = batches_of(epoch, in_epoch * cfg.accum_iter)
            lr = cfg.lr_at(self.step)
            set_lr(self.optimizer, lr)
            step_out, batch = self._accumulate(it, meter)
            finite, grad_norm = self._update(step_out["loss"])
            self.step += 1
            self.task.after_step(self)
            if finite:
                meter.add_step(step_out)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                self._log_scalars(meter, lr, step_out, grad_norm, logger, bar)
            for cb in callbacks:
                cb(self, self.step, batch)
            epoch_end = (self.step % spe == 0 or self.step == cfg.total_steps) and cfg.steps_per_epoch is not None
            if epoch_end:
                self._end_epoch(epoch, meter, logger)
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == end or epoch_end:
                self.save(on_checkpoint() if on_checkpoint else None)
        bar.close()
        if logger:
            logger.close()
        return meter.losses

    def _batch_source(self, data: Any) -> Callable[[int, int], Iterator[Any]]:
        """`source(epoch, start)` -> the iterator of micro-batches from `start` on: a seekable `data` is sought,
        a stream is iterated once and goes on where it stopped."""
        if not hasattr(data, "batches"):
            stream = iter(data)
            return lambda epoch, start: stream
        spe, accum = self.cfg.epoch_steps, self.cfg.accum_iter
        if len(data) < spe * accum:
            raise ValueError(f"the data gives {len(data)} micro-batches per epoch, fewer than steps_per_epoch "
                             f"{spe} x accum_iter {accum}")
        return data.batches

    def _accumulate(self, it: Iterator[Any], meter: _Meter) -> tuple[dict[str, float], Any]:
        """Forward + backward of `accum_iter` micro-batches (RNG re-derived from (seed, rank, step, micro));
        returns the losses averaged over them and the last micro-batch."""
        cfg, dist = self.cfg, self.dist
        step_out: dict[str, float] = {}
        for micro in range(cfg.accum_iter):
            torch.manual_seed(stable_seed(cfg.seed, dist.rank, self.step, micro))
            tw = time.perf_counter()
            batch = next(it)
            meter.waited += time.perf_counter() - tw
            batch = self.task.prepare(batch, dist.device, self.input_dtype)
            torch.manual_seed(stable_seed(cfg.seed, dist.rank, self.step, micro, 1))
            n = self.task.batch_size(batch)
            meter.seen += n
            meter.epoch_seen += n
            self._micro_batch = self._micro_batch or n
            for k, v in self._micro_step(batch, sync=micro == cfg.accum_iter - 1).items():
                step_out[k] = step_out.get(k, 0.0) + v / cfg.accum_iter
        return step_out, batch

    def _update(self, loss: float) -> tuple[bool, float | None]:
        """The optimizer step when the loss is finite on every rank, else skip it (and fail after
        `max_bad_steps` in a row); returns (finite, gradient norm if clipped)."""
        # Decide on every rank alike: gradients are already all-reduced, so one rank's NaN is everyone's.
        finite = all_reduce_max(0.0 if math.isfinite(loss) else 1.0, self.dist) == 0.0
        if finite:
            self.bad_steps = 0
            return True, self._optimizer_step() if self.ds_engine is None else None
        self.bad_steps += 1
        if self.ds_engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        log.warning("non-finite loss at step %d, update skipped (%d in a row)", self.step, self.bad_steps)
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise FloatingPointError(f"{self.bad_steps} non-finite losses in a row at step {self.step}: "
                                     "lower the lr, or use precision bf16/fp32 (MAE is fragile in fp16)")
        return False, None

    def _log_scalars(self, meter: _Meter, lr: float, step_out: dict[str, float], grad_norm: float | None,
                     logger: ScalarLogger | None, bar: tqdm) -> None:
        """Log the mean loss of the last `log_every` steps (over ranks), lr, images/s, the data-wait share, this
        step's other losses and the gradient norm; then restart the throughput meter."""
        elapsed = time.perf_counter() - meter.t0
        ips = meter.seen * self.dist.world_size / max(elapsed, 1e-9)
        recent = meter.losses[-self.cfg.log_every:] or [float("nan")]
        mean_loss = all_reduce_mean(sum(recent) / len(recent), self.dist)
        self.data_wait_fraction = meter.waited / max(elapsed, 1e-9)
        scalars = {"loss": mean_loss, "lr": lr, "images_per_s": ips, "data_wait": self.data_wait_fraction}
        scalars.update({k: v for k, v in step_out.items() if k != "loss"})
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        if logger:
            logger.log(self.step, **scalars)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}",
                        wait=f"{self.data_wait_fraction:.0%}")
        meter.t0, meter.seen, meter.waited = time.perf_counter(), 0, 0.0

    def _end_epoch(self, epoch: int, meter: _Meter, logger: ScalarLogger | None = None) -> None:
        """The epoch's history record (time, images/s, mean losses, the task's entries, validation metrics when
        due, also sent to the experiment trackers); then restart the epoch meter."""
        seconds = time.perf_counter() - meter.epoch_t0
        ips = meter.epoch_seen * self.dist.world_size / max(seconds, 1e-9)
        record: dict[str, Any] = {"epoch": epoch, "seconds": round(seconds, 2), "images_per_s": round(ips, 2),
                                  **{f"loss_{k}" if k != "loss" else k: round(v / max(meter.epoch_count, 1), 5)
                                     for k, v in meter.epoch_sums.items()}}
        record.update(self.task.epoch_record(self, epoch))
        if (epoch + 1) % self.cfg.eval_every == 0 or self.step == self.cfg.total_steps:
            metrics = self._evaluate(epoch)
            if metrics:
                record["val"] = metrics
                if logger:
                    logger.track(self.step, **{f"val/{k}": v for k, v in metrics.items()
                                               if isinstance(v, (int, float))})
        self.history.append(record)
        if self.dist.is_main:
            log.info("epoch %d: %s", epoch, {k: v for k, v in record.items() if k != "epoch"})
        meter.epoch_t0, meter.epoch_seen, meter.epoch_sums, meter.epoch_count = time.perf_counter(), 0, {}, 0


@dataclass
class _Meter:
    """What `Engine.fit` counts between log lines (throughput, data wait) and over an epoch."""

    losses: list[float] = dataclasses.field(default_factory=list)  # finite step losses of this fit call
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    seen: int = 0
    waited: float = 0.0
    epoch_t0: float = dataclasses.field(default_factory=time.perf_counter)
    epoch_seen: int = 0
    epoch_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    epoch_count: int = 0

    def add_step(self, step_out: dict[str, float]) -> None:
        """Count a finite step's losses."""
        self.losses.append(step_out["loss"])
        for k, v in step_out.items():
            self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
        self.epoch_count += 1


def run_facts(engine: Engine) -> dict[str, Any]:
    """What a run's `metrics.json` records about how it trained: world size, global batch, steps per epoch,
    precision, images/s (mean over epochs) and the share of step time spent waiting for data."""
    ips = [h["images_per_s"] for h in engine.history if "images_per_s" in h]
    return {"world_size": engine.dist.world_size, "global_batch": engine.global_batch,
            "steps_per_epoch": engine.cfg.epoch_steps, "precision": engine.cfg.precision,
            "images_per_s": round(sum(ips) / len(ips), 2) if ips else None,
            "data_wait_fraction": None if engine.data_wait_fraction is None else round(engine.data_wait_fraction, 4)}
