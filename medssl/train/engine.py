"""One training loop for plain python, torchrun (DDP) and DeepSpeed.

The engine takes a model, an iterator of batches and a forward function returning the loss; it knows no
task. It owns the optimizer (AdamW, client-side, so DeepSpeed compiles nothing), the per-iteration lr
schedule, gradient accumulation and clipping, mixed precision, logging, atomic checkpoints and exact
resume (model, optimizer, schedule step, scaler, RNG; the RNG is also re-derived from (seed, rank, step)
at every step so that a resumed run draws the same masks as an uninterrupted one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
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
from medssl.train.optim import cosine_lr, make_adamw, param_groups, set_lr
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


@dataclass
class TrainConfig:
    """Optimisation settings (the lr is the absolute peak, already scaled by the batch)."""

    total_steps: int
    lr: float
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum: int = 1
    clip_grad: float | None = None
    precision: str = "auto"
    log_every: int = 10
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    max_bad_steps: int = 20
    stop_at: int | None = None  # leave after this step (checkpointed), as a time-boxed job; resume later

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.total_steps < 1 or self.grad_accum < 1:
            raise ValueError("total_steps and grad_accum must be >= 1")
        self.betas = tuple(self.betas)


Callback = Callable[["Engine", int, Any], None]


class Engine:
    """Wraps a model for training under the launcher described by `dist`."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | os.PathLike, dist: DistInfo,
                 ds_config: dict | None = None, micro_batch_size: int | None = None,
                 groups: list[dict] | None = None):
        self.cfg, self.dist, self.out_dir = cfg, dist, Path(out_dir)
        chosen = resolve_precision(cfg.precision, dist.device)
        if chosen != cfg.precision and dist.is_main:
            log.info("precision auto -> %s on %s", chosen, dist.device)
        cfg.precision = chosen
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.step = 0
        self.bad_steps = 0
        self.model = model.to(dist.device)
        groups = groups if groups is not None else param_groups(model, cfg.weight_decay)
        for g in groups:
            g.pop("names", None)  # not needed by the optimizer; keeps checkpoints small
        self.optimizer = make_adamw(groups, lr=cfg.lr, betas=cfg.betas)
        self.scaler = None
        self.ds_engine = None
        if dist.backend == "deepspeed":
            self._init_deepspeed(ds_config or {}, micro_batch_size)
        elif dist.backend == "ddp":
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
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
                  "gradient_accumulation_steps": self.cfg.grad_accum,
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

    def _autocast(self):
        if self.ds_engine is not None or self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint the full training state (every rank must call; rank 0 writes for plain/DDP)."""
        client = {"step": self.step, "train_config": dataclasses.asdict(self.cfg), **(extra or {}),
                  "model_config": dict(getattr(self.module, "config", {}) or {})}
        if self.ds_engine is not None:
            self.ds_engine.save_checkpoint(str(self.ckpt_dir), tag=f"step{self.step:08d}", client_state=client)
            return
        if self.dist.is_main:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": {"step": self.step}, "scaler": self.scaler.state_dict() if self.scaler else {},
                     "rng": rng_state(), **client}
            save_checkpoint(checkpoint_path(self.ckpt_dir, self.step), state)
            prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        barrier(self.dist)

    def resume(self) -> int:
        """Continue from the newest checkpoint in `out_dir/checkpoints` if there is one; returns the step."""
        if self.ds_engine is not None:
            if not (self.ckpt_dir / "latest").is_file():
                return 0
            _, client = self.ds_engine.load_checkpoint(str(self.ckpt_dir))
            self.step = int(client["step"])
        else:
            path = latest_checkpoint(self.ckpt_dir)
            if path is None:
                return 0
            state = load_checkpoint(path)
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:  # the kernel choice is this run's, not the checkpoint's
                group["fused"] = self.optimizer.defaults.get("fused")
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            self.step = int(state["step"])
        if self.dist.is_main:
            log.info("resumed from %s at step %d", self.ckpt_dir, self.step)
        return self.step

    # ------------------------------------------------------------------------------------ training
    def _micro_step(self, forward: Callable[[nn.Module, Any], torch.Tensor], batch: Any, sync: bool) -> float:
        if self.ds_engine is not None:
            loss = forward(self.model, batch)
            self.ds_engine.backward(loss)
            self.ds_engine.step()
            return loss.item()
        no_sync = self.model.no_sync if (self.dist.backend == "ddp" and not sync) else contextlib.nullcontext
        with no_sync():
            with self._autocast():
                loss = forward(self.model, batch)
            scaled = loss / self.cfg.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.item()

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

    def fit(self, batches: Iterable[Any], forward: Callable[[nn.Module, Any], torch.Tensor],
            callbacks: Sequence[Callback] = (), batch_size: Callable[[Any], int] | None = None,
            on_checkpoint: Callable[[], dict[str, Any]] | None = None) -> list[float]:
        """Train from `self.step` to `cfg.total_steps`; returns the per-step mean losses of this call.

        `batches` must already start at the resume point (the data stream's `start_step`).
        """
        cfg, dist = self.cfg, self.dist
        logger = ScalarLogger(self.out_dir, enabled=dist.is_main, resume_step=self.step)
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not dist.is_main, dynamic_ncols=True,
                   desc="train")
        it = iter(batches)
        losses: list[float] = []
        t0, seen = time.perf_counter(), 0
        self.model.train()
        end = min(cfg.total_steps, cfg.stop_at) if cfg.stop_at else cfg.total_steps
        while self.step < end:
            lr = cosine_lr(self.step, cfg.total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr)
            set_lr(self.optimizer, lr)
            step_losses = []
            for micro in range(cfg.grad_accum):
                torch.manual_seed(stable_seed(cfg.seed, dist.rank, self.step, micro))
                batch = next(it)
                batch = batch.to(dist.device, self.input_dtype, non_blocking=True) if torch.is_tensor(batch) else batch
                seen += batch_size(batch) if batch_size else len(batch)
                step_losses.append(self._micro_step(forward, batch, sync=micro == cfg.grad_accum - 1))
            loss = sum(step_losses) / len(step_losses)
            # Decide on every rank alike: gradients are already all-reduced, so one rank's NaN is everyone's.
            finite = all_reduce_max(0.0 if math.isfinite(loss) else 1.0, dist) == 0.0
            grad_norm = None
            if finite:
                self.bad_steps = 0
                if self.ds_engine is None:
                    grad_norm = self._optimizer_step()
            else:
                self.bad_steps += 1
                if self.ds_engine is None:
                    self.optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite loss at step %d, update skipped (%d in a row)", self.step, self.bad_steps)
                if self.bad_steps >= cfg.max_bad_steps:
                    raise FloatingPointError(f"{self.bad_steps} non-finite losses in a row at step {self.step}: "
                                             "lower the lr, or use precision bf16/fp32 (MAE is fragile in fp16)")
            self.step += 1
            if finite:
                losses.append(loss)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                elapsed = time.perf_counter() - t0
                ips = seen * dist.world_size / max(elapsed, 1e-9)
                recent = losses[-cfg.log_every:] or [float("nan")]
                mean_loss = all_reduce_mean(sum(recent) / len(recent), dist)
                scalars = {"loss": mean_loss, "lr": lr, "images_per_s": ips}
                if grad_norm is not None:
                    scalars["grad_norm"] = grad_norm
                logger.log(self.step, **scalars)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                t0, seen = time.perf_counter(), 0
            for cb in callbacks:
                cb(self, self.step, batch)
            if self.step % cfg.ckpt_every == 0 or self.step == end:
                self.save(on_checkpoint() if on_checkpoint else None)
        bar.close()
        logger.close()
        return losses
