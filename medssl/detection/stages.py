"""MedMask training stages as tasks of the one engine (`medssl.train.Engine`).

Stages, each starting from the previous stage's best checkpoint (chosen by validation R@0.3):

* ``source_only``: supervised detection on the labelled images.
* ``cross_domain_mae``: detection loss on labelled images + feature-MAE loss on unlabelled target
  images + expert contrastive distillation (when an embeddings folder is configured).
* ``teaching``: MRT-style EMA teacher; pseudo-labels from weak views (score threshold, class-agnostic
  NMS) supervise the student on strong views of the same images, alongside the labelled loss; feature
  MAE for the first ``mae_epochs``; every ``retrain_every`` epochs the student's non-decoder weights
  go back to their values at the start of the stage (selective retraining; the teacher keeps what it
  learnt). The teacher is the model evaluated and saved (``keep_better``: the better of teacher and student on
  validation, as MRT). The pseudo-label threshold is ``score_threshold``, MRT's dynamic threshold or MedMask's
  schedule (``threshold``).

Controls, as options of the same stages: ``target_forward`` sends the unlabelled target batch through the
detector in train mode with no loss (BatchNorm statistics adapt: the AdaBN control of the feature MAE);
``freeze_bn`` keeps the BatchNorm layers in eval mode (statistics frozen); a stage 2 with neither MAE nor
``target_forward`` reads no target batch (more epochs on the labelled images only). ``eval.checkpoint``
chooses what a stage hands on: its best epoch on validation (``best``) or its last epoch (``last``).

Every stage runs under python, torchrun or DeepSpeed (each rank reads its own share of the labelled and of
the unlabelled images; validation is gathered over the whole split), writes an atomic checkpoint at least
every epoch in ``<out>/<stage>/checkpoints`` and resumes exactly; ``best.pt`` / ``last.pt`` hold the
detector's config and every weight, so they work without the backbone they were trained from.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from medssl.data.coco import build_dataset
from medssl.data.epochs import PairedBatches
from medssl.detection.box_ops import cxcywh_to_xyxy
from medssl.detection.config import CHECKPOINTS, DEFAULTS, STAGES, THRESHOLDS, detr_config
from medssl.detection.criterion import SetCriterion
from medssl.detection.data import build_splits, epoch_batches, to_device, transforms
from medssl.detection.detr import DeformableDETR, build_detector
from medssl.detection.evaluation import (
    evaluate,
    heldout_results,
    operating_threshold,
    pseudo_label_quality,
    random_baseline,
    save_overlays,
)
from medssl.detection.medmask import (
    EmbeddingStore,
    ExpertDistiller,
    FeatureMAE,
    ema_update,
    medmask_threshold,
    mrt_threshold,
    non_decoder_names,
    pseudo_labels,
    reset_non_decoder,
)
from medssl.detection.predict import load_detector
from medssl.train.checkpoint import load_checkpoint, save_checkpoint
from medssl.train.dist import DistInfo, all_gather_objects, barrier, resolve_device
from medssl.train.engine import Engine, TrainConfig, run_facts
from medssl.train.optim import lr_scale_groups
from medssl.train.task import Task
from medssl.utils import seed_everything

__all__ = ["DEFAULTS", "STAGES", "StageModel", "StageTask", "build_medmask", "run_stages", "stage_done", "train_stage"]

log = logging.getLogger("medssl")


def build_medmask(cfg: dict, embed_dim: int | None) -> tuple[DeformableDETR, FeatureMAE, ExpertDistiller | None]:
    """Detector, feature-MAE decoder and (if the expert width is known) distiller, randomly initialised."""
    model = build_detector(detr_config(cfg))
    mc = model.cfg
    c5 = model.backbone.num_channels[-1]
    mae = FeatureMAE(mc.hidden_dim, c5, level=len(model.backbone.num_channels) - 1,
                     n_levels=mc.num_feature_levels, n_heads=mc.nheads, n_points=mc.dec_n_points,
                     num_layers=cfg["mae"]["layers"], dim_feedforward=mc.dim_feedforward,
                     mask_ratio=cfg["mae"]["mask_ratio"], attn_impl=mc.attn_impl)
    dist = None
    if embed_dim is not None:
        dc = cfg["distill"]
        dist = ExpertDistiller(mc.hidden_dim, embed_dim, dc["proj_dim"], dc["temperature"], dc["mode"], dc["margin"],
                               dc["regions"], dc["grid_offset"])
    return model, mae, dist


class StageModel(nn.Module):
    """The modules one stage trains (detector, feature MAE, distiller; the EMA teacher rides along, frozen).

    ``forward(batch)`` is the stage's loss dict, so that DDP / DeepSpeed see one module and one forward pass.
    A batch is ``(images, mask, targets, embeddings)`` when the stage reads no target image (``paired``
    False: ``source_only``, or a stage 2 with neither MAE nor ``target_forward``), else a pair of that and the
    unlabelled target batch ``((weak, strong), mask, targets, embeddings)``.
    """

    def __init__(self, stage: str, sc: dict, detector: DeformableDETR, mae: FeatureMAE | None,
                 distiller: ExpertDistiller | None, teacher: DeformableDETR | None, paired: bool) -> None:
        super().__init__()
        self.stage, self.sc, self.paired = stage, sc, paired
        self.detector, self.mae, self.distiller, self.teacher = detector, mae, distiller, teacher
        self.crit = SetCriterion(detector.cfg.num_classes)
        self.epoch = 0  # set by the task at every epoch start (the feature MAE stops after mae_epochs)
        self.threshold = float(sc["score_threshold"])  # pseudo-label score threshold, set by the task per epoch
        self.matched = [0.0, 0]  # sum and count of matched source scores this epoch (MRT's threshold)

    def train(self, mode: bool = True) -> StageModel:
        """As `nn.Module.train`, but the EMA teacher stays in eval mode (it only ever predicts) and, with
        ``freeze_bn``, so do the detector's BatchNorm layers (running statistics frozen, affine weights train)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if mode and self.sc["freeze_bn"]:
            for m in self.detector.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _distill(self, out: dict[str, Any], emb: list[torch.Tensor | None], targets: list[dict]) -> torch.Tensor:
        """Weighted distillation loss of a detector output; ``object`` mode gets the predicted boxes in the
        expert's view (un-mirrored where the sample was flipped) and the query scores."""
        boxes = scores = None
        if self.distiller.mode == "object":
            boxes = cxcywh_to_xyxy(out["pred_boxes"].detach().float())  # [N, Q, 4] normalised
            flip = torch.stack([t.get("hflip", torch.tensor(False)) for t in targets]).to(boxes.device)  # [N]
            mirrored = torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1)
            boxes = torch.where(flip[:, None, None], mirrored, boxes)
            scores = out["pred_logits"].detach().float().sigmoid().amax(-1)  # [N, Q]
        return self.sc["distill_weight"] * self.distiller(out["hs"], emb, boxes, scores)

    @torch.no_grad()
    def _count_matched(self, out: dict[str, Any], targets: list[dict]) -> None:
        """Add the scores of the predictions matched to the source labels (MRT's threshold statistic)."""
        probs = out["pred_logits"].float().sigmoid()  # [N, Q, K]
        for i, (src, tgt) in enumerate(self.crit.matcher(out, targets)):
            sc = probs[i, src.to(probs.device), targets[i]["labels"][tgt].to(probs.device)]  # [M]
            self.matched[0] += float(sc.sum())
            self.matched[1] += len(sc)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        sc, stage = self.sc, self.stage
        labelled, target = batch if self.paired else (batch, None)
        images, mask, targets, emb = labelled
        losses: dict[str, torch.Tensor] = {}
        out = self.detector(images, mask)
        losses["det"] = sc["source_weight"] * sum(self.crit(out, targets).values())
        if stage == "teaching" and sc["threshold"] == "mrt":
            self._count_matched(out, targets)
        if self.distiller is not None and stage == "cross_domain_mae":
            losses["distill"] = self._distill(out, emb, targets)
        if target is not None:
            (weak, strong), tmask, ttargets, temb = target
            view = weak if stage == "teaching" else strong  # the view the feature MAE (or its control) sees
            if stage == "teaching":
                with torch.no_grad():
                    pl = pseudo_labels(self.teacher(weak, tmask), self.threshold, sc["nms_iou"])
                sout = self.detector(strong, tmask)
                losses["pseudo"] = sc["pseudo_weight"] * sum(self.crit(sout, pl).values())
                if self.distiller is not None:
                    losses["distill"] = self._distill(sout, temb, ttargets)
            if sc["target_forward"]:  # AdaBN control: train-mode forward, no loss (BatchNorm statistics adapt)
                with torch.no_grad():
                    self.detector(view, tmask)
            if self.mae is not None and (stage != "teaching" or self.epoch < sc["mae_epochs"]):
                mout = self.detector(view, tmask, mask_ratio=self.mae.mask_ratio)
                losses["mae"] = sc["mae_weight"] * self.mae(mout["features"], mout["features"]["token_masks"])
        total = sum(losses.values())
        if stage == "teaching":
            losses["n_pseudo"] = torch.tensor(float(sum(len(p["labels"]) for p in pl)))  # logged, not minimised
        return {"loss": total, **losses}


def _expert(cfg: dict, sc: dict, train: Dataset) -> tuple[EmbeddingStore | None, int | None]:
    """The embeddings store and the expert's width (read from the first training embedding found)."""
    if not (sc["distill_weight"] > 0 and cfg["data"]["embeddings"]):
        return None, None
    store = EmbeddingStore(cfg["data"]["embeddings"], cfg["data"]["skip_missing_embeddings"])
    probe = next((e for e in (store.load(train.file_of(i)) for i in range(len(train))) if e is not None), None)
    store.missing = 0
    return store, None if probe is None else probe.shape[-1]


class StageTask(Task):
    """One MedMask stage: losses, the EMA teacher, selective retraining, validation FROC and `best.pt`.

    Args:
        stage: a name from `STAGES`.
        cfg: resolved run config.
        splits: datasets from `build_splits`.
        sdir: the stage's folder (``best.pt`` goes there).
        init: the checkpoint this stage starts from (None: the configured pretrained backbone only).
        load_init: load the weights now (False when resuming: the checkpoint holds them).
    """

    find_unused_parameters = True  # the feature MAE sits out the later teaching epochs

    def __init__(self, stage: str, cfg: dict, splits: dict[str, Dataset], sdir: Path,
                 init: str | Path | None = None, load_init: bool = True) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        sc = cfg[stage]
        if int(sc["epochs"]) < 1:
            raise ValueError(f"{stage}.epochs must be >= 1, got {sc['epochs']}")
        if sc["threshold"] not in THRESHOLDS:
            raise ValueError(f"{stage}.threshold must be one of {THRESHOLDS}, got {sc['threshold']!r}")
        if cfg["eval"]["checkpoint"] not in CHECKPOINTS:
            raise ValueError(f"eval.checkpoint must be one of {CHECKPOINTS}, got {cfg['eval']['checkpoint']!r}")
        self.stage, self.cfg, self.sc, self.splits, self.sdir = stage, cfg, sc, splits, sdir
        self.store, embed_dim = _expert(cfg, sc, splits["train"])
        seed_everything(cfg["seed"])  # the same fresh modules in every process and every restart
        detector, mae, distiller = build_medmask(cfg, embed_dim)
        if load_init:
            self._initialise(detector, mae, distiller, init)
        use_mae = sc["mae_weight"] > 0 and stage != "source_only"
        use_dist = distiller is not None and sc["distill_weight"] > 0 and stage != "source_only"
        teacher = None
        self.snapshot: dict[str, torch.Tensor] = {}
        if stage == "teaching":
            teacher = copy.deepcopy(detector).eval().requires_grad_(False)
            keep = set(non_decoder_names(detector))
            self.snapshot = {n: p.detach().clone() for n, p in detector.named_parameters() if n in keep}
        # the unlabelled target batches are read only by a stage that uses them
        self.paired = stage == "teaching" or (stage != "source_only" and (use_mae or bool(sc["target_forward"])))
        super().__init__(StageModel(stage, sc, detector, mae if use_mae else None,
                                    distiller if use_dist else None, teacher, self.paired))
        self.mae, self.distiller = mae, distiller  # saved in best.pt even when this stage does not train them
        self.missing: dict[str, int] = {}
        self.best_eval: tuple[dict, list] | None = None
        self.ema_shadow: list[torch.Tensor] | None = None  # float32 EMA of a bf16 teacher (DeepSpeed bf16)
        self._truth: Dataset | None = None  # the target pool with its boxes (eval.pseudo_truth), read once
        self.threshold_epoch = 0  # the epoch whose pseudo-label threshold is set (MRT updates once per epoch)
        self._kept: DeformableDETR | None = None  # keep_better: the model that won the last evaluation

    def _initialise(self, detector: DeformableDETR, mae: FeatureMAE, distiller: ExpertDistiller | None,
                    init: str | Path | None) -> None:
        if init is None:
            loaded = detector.load_pretrained()  # the explicit init step: pretrained backbone weights, once
            if loaded:
                log.info("[%s] backbone initialised from %s", self.stage, loaded)
            return
        ck = load_checkpoint(init)
        detector.load_state_dict(ck["model"])
        if "mae" in ck:
            mae.load_state_dict(ck["mae"])
        if distiller is not None and ck.get("distiller") is not None:
            try:
                distiller.load_state_dict(ck["distiller"])
            except RuntimeError:
                log.warning("[%s] distiller weights in %s do not fit; starting it afresh", self.stage, init)

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return model(batch)  # StageModel.forward, through the DDP / DeepSpeed wrapper

    # ------------------------------------------------------------------------------------- batches
    def _embeddings(self, ds: Dataset, targets: list[dict], device: torch.device) -> list[torch.Tensor | None]:
        if self.store is None:
            return [None] * len(targets)
        before = self.store.missing
        out = [self.store.load(ds.file_of(int(t["index"]))) for t in targets]
        key = str(self.model.epoch)
        self.missing[key] = self.missing.get(key, 0) + self.store.missing - before
        return [None if e is None else e.to(device) for e in out]

    def prepare(self, batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
        m = self.model
        labelled, target = batch if self.paired else (batch, None)
        images, mask, targets = labelled
        emb = self._embeddings(self.splits["train"], targets, device) if (
            m.distiller is not None and self.stage == "cross_domain_mae") else [None] * len(targets)
        labelled = (images.to(device, dtype), mask.to(device), to_device(targets, device), emb)
        if target is None:
            return labelled
        views, tmask, ttargets = target
        temb = self._embeddings(self.splits["target"], ttargets, device) if (
            m.distiller is not None and self.stage == "teaching") else [None] * len(ttargets)
        return labelled, (tuple(v.to(device, dtype) for v in views), tmask.to(device), ttargets, temb)

    def batch_size(self, batch: Any) -> int:
        return len((batch[0] if self.paired else batch)[0])

    # ------------------------------------------------------------------------------------- hooks
    def param_groups(self, weight_decay: float) -> list[dict]:
        """The reference Deformable DETR groups: backbone at ``lr_backbone``, sampling offsets and reference
        point projections at ``lr * lr_linear_proj_mult``, everything else (and the MedMask modules) at ``lr``."""
        sc, tc = self.sc, self.cfg["train"]
        rules = [("backbone", lambda n: n.startswith("detector.backbone."), sc["lr_backbone"] / sc["lr"]),
                 ("proj", lambda n: "sampling_offsets" in n or "reference_points" in n, tc["lr_linear_proj_mult"])]
        return lr_scale_groups(self.model, rules, weight_decay)

    def on_epoch_start(self, engine: Engine, epoch: int) -> None:
        self.model.epoch = epoch
        if self.stage == "teaching":
            self.model.threshold = self._threshold(engine, epoch)
        every = self.sc["retrain_every"]
        if self.stage == "teaching" and every and epoch and epoch % every == 0:
            n = reset_non_decoder(self.model.detector, self.snapshot)
            log.info("[%s] epoch %d: selective retraining reset %d non-decoder tensors of the student",
                     self.stage, epoch, n)

    def _threshold(self, engine: Engine, epoch: int) -> float:
        """The pseudo-label score threshold of ``epoch`` (``threshold``: fixed, MRT's dynamic one, MedMask's)."""
        sc, m = self.sc, self.model
        if sc["threshold"] == "medmask":
            return medmask_threshold(epoch, int(sc["epochs"]))
        if sc["threshold"] == "fixed" or epoch <= self.threshold_epoch:
            return m.threshold
        parts = all_gather_objects(list(m.matched), engine.dist)  # the finished epoch's matched scores, all ranks
        total, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
        m.matched, self.threshold_epoch = [0.0, 0], epoch
        return mrt_threshold(m.threshold, total / n, sc["threshold_max"]) if n else m.threshold

    def after_step(self, engine: Engine) -> None:
        teacher = self.model.teacher
        if teacher is None:
            return
        if self.ema_shadow is None and any(p.dtype in (torch.bfloat16, torch.float16) for p in teacher.parameters()):
            self.ema_shadow = [p.detach().float().clone() for p in teacher.parameters()]  # DeepSpeed bf16
        ema_update(teacher, self.model.detector, self.sc["ema_alpha"], self.ema_shadow)

    @property
    def eval_model(self) -> DeformableDETR:
        """The model this stage evaluates and saves: the teacher in ``teaching``, else the detector."""
        return self.model.teacher if self.model.teacher is not None else self.model.detector

    def evaluate(self, engine: Engine, epoch: int) -> dict[str, float]:
        """Validation summary of `eval_model`; with ``keep_better`` (teaching) the student is scored too and
        the better of the two on ``eval.select`` (ties: the teacher) is the one reported and saved as best."""
        args = (self.splits["val"], self.cfg, engine.dist.device, engine.dist)
        summary, curve, preds = evaluate(self.eval_model, *args)
        self._kept = self.eval_model
        if self.stage == "teaching" and self.sc["keep_better"]:
            s_summary, s_curve, s_preds = evaluate(self.model.detector, *args)
            select = self.cfg["eval"]["select"]
            if float(s_summary[select]) > float(summary[select]):
                summary, curve, preds, self._kept = s_summary, s_curve, s_preds, self.model.detector
            summary = {**summary, "kept_student": float(self._kept is self.model.detector)}
        self._last = (curve, preds)
        return summary

    def on_best(self, engine: Engine, epoch: int, metrics: dict[str, float]) -> None:
        self.best_eval = self._last
        if engine.dist.is_main:
            self.save(self.sdir / "best.pt", epoch, metrics, self._kept)

    def epoch_record(self, engine: Engine, epoch: int) -> dict[str, Any]:
        n = self.missing.get(str(epoch), 0)
        record: dict[str, Any] = {"missing_embeddings": n} if n else {}
        if self.stage == "teaching":
            record["pseudo_threshold"] = round(self.model.threshold, 4)  # the epoch's pseudo-label score threshold
        truth = self.cfg["eval"]["pseudo_truth"]
        if self.stage == "teaching" and truth and engine.dist.is_main:  # diagnostic only: never trains anything
            if self._truth is None:
                d = self.cfg["data"]
                self._truth = build_dataset(d["target_dataset"] or d["dataset"], truth, d["data_root"],
                                            transforms(self.cfg, "none"))
            with engine.autocast():  # the precision the teacher labels with in training
                quality = pseudo_label_quality(self.model.teacher, self._truth, self.cfg, self.model.threshold,
                                               self.sc["nms_iou"], engine.dist.device)
            record.update({k: round(v, 4) for k, v in quality.items()})
            self.model.teacher.eval()
        return record

    def extra_state(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "missing": dict(self.missing), "ema_shadow": self.ema_shadow,
                "threshold": [self.model.threshold, self.threshold_epoch, list(self.model.matched)]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.snapshot = state.get("snapshot", self.snapshot)
        self.missing = dict(state.get("missing", {}))
        self.ema_shadow = state.get("ema_shadow")
        if "threshold" in state:
            t, self.threshold_epoch, matched = state["threshold"]
            self.model.threshold, self.model.matched = float(t), list(matched)

    def save(self, path: Path, epoch: int, metrics: dict, model: DeformableDETR | None = None) -> None:
        """A self-contained stage checkpoint: detector config (with the backbone's record) and every weight of
        ``model`` (default: `eval_model`)."""
        model = model if model is not None else self.eval_model
        save_checkpoint(path, {"model": {k: v.float() if v.is_floating_point() else v
                                         for k, v in model.state_dict().items()},
                               "mae": self.mae.state_dict(),
                               "distiller": None if self.distiller is None else self.distiller.state_dict(),
                               "detector": asdict(model.cfg), "data": dict(self.cfg["data"]), "stage": self.stage,
                               "epoch": epoch, "metrics": {k: float(v) for k, v in metrics.items()}})


# ----------------------------------------------------------------------------------------- running
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def stage_done(sdir: Path) -> bool:
    """Whether the stage folder `sdir` holds a finished stage (``metrics.json`` marked complete and ``best.pt``)."""
    f = sdir / "metrics.json"
    return f.is_file() and (sdir / "best.pt").is_file() and json.loads(f.read_text()).get("complete", False)


def train_stage(stage: str, cfg: dict, out_dir: str | Path, init: str | Path | None = None,
                splits: dict[str, Dataset] | None = None, dist: DistInfo | None = None,
                ds_config: dict | None = None, resume: bool = False) -> dict[str, Any]:
    """Train one MedMask stage; writes ``out_dir/<stage>/{best.pt,last.pt,metrics.json,froc.png,checkpoints/}``.

    Args:
        stage: one of ``source_only``, ``cross_domain_mae``, ``teaching``.
        cfg: resolved run config (see ``DEFAULTS``).
        out_dir: run folder.
        init: checkpoint to start from (the previous stage's best), or None.
        splits: datasets from :func:`build_splits` (built if None).
        dist: launcher (default: one process on ``cfg["device"]``).
        ds_config: DeepSpeed config (under the DeepSpeed launcher).
        resume: continue from the stage's newest checkpoint, if it has one (else start afresh).

    Returns:
        ``{"best": summary of the best epoch, "best_epoch": int, "checkpoint": path (``best.pt`` or ``last.pt``
        as ``eval.checkpoint`` says), "history": [...], ...}``.
    """
    dist = dist or DistInfo(device=resolve_device(cfg["device"]))
    splits = splits or build_splits(cfg)
    sdir = Path(out_dir) / stage
    ckpts = sdir / "checkpoints"
    if not resume and ckpts.is_dir() and dist.is_main:
        shutil.rmtree(ckpts)  # a fresh run of this stage: the old one's checkpoints must not be resumed
    barrier(dist)
    resuming = resume and ckpts.is_dir() and any(ckpts.iterdir())
    task = StageTask(stage, cfg, splits, sdir, init, load_init=not resuming)
    sc, tc, d = task.sc, cfg["train"], cfg["data"]
    data = epoch_batches(splits["train"], cfg, cfg["seed"], dist.rank, dist.world_size)
    if task.paired:
        data = PairedBatches(data, epoch_batches(splits["target"], cfg, cfg["seed"] + 1, dist.rank, dist.world_size))
    spe = max(1, len(data) // tc["accum_iter"])
    tcfg = TrainConfig(total_steps=sc["epochs"] * spe, lr=sc["lr"], schedule="step",
                       lr_drop_step=None if sc["lr_drop"] is None else sc["lr_drop"] * spe,
                       weight_decay=tc["weight_decay"], betas=(0.9, 0.999), accum_iter=tc["accum_iter"],
                       clip_grad=tc["clip_grad"] or None, precision=tc["precision"],
                       log_every=tc["log_every"] or spe, ckpt_every=tc["ckpt_every"],
                       keep_checkpoints=tc["keep_checkpoints"], seed=cfg["seed"], steps_per_epoch=spe,
                       eval_every=tc["eval_every"], select=cfg["eval"]["select"], max_bad_steps=1)
    engine = Engine(task, tcfg, sdir, dist, ds_config=ds_config, micro_batch_size=d["batch_size"])
    if resuming:
        engine.resume()
    if dist.is_main:
        log.info("[%s] %d epochs x %d steps, global batch %d x %d ranks x %d accumulation, from step %d", stage,
                 sc["epochs"], spe, d["batch_size"], dist.world_size, tc["accum_iter"], engine.step)
    engine.fit(data)
    best_ckpt = sdir / "best.pt"
    handed = sdir / f"{cfg['eval']['checkpoint']}.pt"  # what the next stage starts from (eval.checkpoint)
    result = {"stage": stage, "best_epoch": engine.best["epoch"], "best": engine.best["metrics"],
              "checkpoint": str(handed), "history": engine.history, **run_facts(engine)}
    curve = None
    if dist.is_main:
        task.save(sdir / "last.pt", sc["epochs"] - 1, engine.history[-1].get("val", {}) if engine.history else {})
    if best_ckpt.is_file():
        if task.best_eval is None:  # resumed after the best epoch: score the saved best again
            model, _ = load_detector(best_ckpt, dist.device)
            _, *task.best_eval = evaluate(model, splits["val"], cfg, dist.device, dist)
        curve, preds = task.best_eval
        if dist.is_main:
            from medssl.viz import save_froc

            save_froc(sdir / "froc.png", curve, title=f"{stage}: validation FROC (best epoch)")
            result["overlays"] = save_overlays(splits["val"], preds, sdir / "overlays", cfg["eval"]["overlays"],
                                               operating_threshold(curve, 0.3))
    if dist.is_main:
        _write_json(sdir / "metrics.json", {**result, "complete": True})
    barrier(dist)
    return {**result, "curve": curve}


def run_stages(cfg: dict, stages: Iterable[str], init: str | Path | None = None, dist: DistInfo | None = None,
               ds_config: dict | None = None, resume: bool = False) -> dict[str, Any]:
    """Run several stages in order, each from the previous one's best checkpoint, plus the random-box
    baseline on the same validation images; writes ``out/summary.json`` and ``out/froc_all.png``.

    With ``resume``, finished stages are kept (their best checkpoint feeds the next) and the stage that was
    interrupted continues from its newest checkpoint.
    """
    from medssl.viz import save_froc

    dist = dist or DistInfo(device=resolve_device(cfg["device"]))
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    splits = build_splits(cfg)
    base_summary, base_curve = random_baseline(splits["train"], splits["val"], cfg, seed=cfg["seed"])
    results: dict[str, Any] = {"random_boxes": base_summary}
    curves = {"random boxes": base_curve}
    for stage in stages:
        sdir = out / stage
        if resume and stage_done(sdir):
            if dist.is_main:
                log.info("[%s] finished earlier: kept (%s)", stage, sdir / "best.pt")
            res = json.loads((sdir / "metrics.json").read_text())
            model, _ = load_detector(sdir / "best.pt", dist.device)
            res["curve"] = evaluate(model, splits["val"], cfg, dist.device, dist)[1]
        else:
            res = train_stage(stage, cfg, out, init=init, splits=splits, dist=dist, ds_config=ds_config,
                              resume=resume)
        results[stage] = res["best"]
        init = res["checkpoint"]
        if res.get("curve") is not None:
            curves[stage] = res["curve"]
    if dist.is_main:
        save_froc(out / "froc_all.png", curves, title="validation FROC per stage vs random boxes")
    rule = cfg["eval"]["checkpoint"]
    test = heldout_results(cfg, splits["train"], {s: out / s / f"{rule}.pt" for s in stages}, dist)
    if test:
        results["test"] = test
    if dist.is_main:
        summary_file = out / "summary.json"
        previous = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        merged = {**previous, **{k: v for k, v in results.items() if k not in ("test", "final")}}  # keep earlier
        if test:
            merged["test"] = {**previous.get("test", {}), **test}
        merged["final"] = results["final"] = hand_over(out, merged, cfg["eval"]["select"], rule)
        _write_json(summary_file, merged)
    return results


def handed_stage(summary: dict[str, Any], ran: list[str], select: str, rule: str = "best") -> str:
    """The stage whose checkpoint a run hands over: under ``rule`` ``best`` the one of ``ran`` (finished stages,
    in order) with the highest validation ``select`` in ``summary`` (NaN or missing counts as the lowest; ties
    go to the earlier stage), under ``last`` the last one."""
    def score(stage: str) -> float:
        v = summary[stage].get(select)
        return float("-inf") if v is None or math.isnan(float(v)) else float(v)

    return max(ran, key=lambda s: (score(s), -ran.index(s))) if rule == "best" else ran[-1]


def hand_over(out: Path, summary: dict[str, Any], select: str, rule: str = "best") -> dict[str, Any]:
    """Copy a stage's checkpoint to ``out/final.pt``. ``rule`` ``best``: the best stage's ``best.pt``, so that the
    run never hands over a model that is worse on validation than one of its earlier stages (teaching can lose
    what the feature MAE gained); ``last`` (no selection): the last finished stage's ``last.pt``.

    Args:
        out: the run folder (one sub-folder per finished stage).
        summary: validation summary per stage (``summary.json``'s entries).
        select: the validation metric that picks (``eval.select``; ties go to the earlier stage).
        rule: ``eval.checkpoint``.

    Returns:
        ``{"stage", "select", "val", "checkpoint"}``, as stored under ``final`` in ``summary.json`` (``val``: the
        chosen stage's best validation score).
    """
    import shutil

    ran = [s for s in STAGES if isinstance(summary.get(s), dict) and (out / s / f"{rule}.pt").is_file()]
    if not ran:
        raise FileNotFoundError(f"{out}: no finished stage to hand over")
    best = handed_stage(summary, ran, select, rule)
    tmp = out / ".final.pt.tmp"
    shutil.copyfile(out / best / f"{rule}.pt", tmp)
    os.replace(tmp, out / "final.pt")
    log.info("final model: %s (%s.pt; validation %s %.3f) -> %s", best, rule, select, summary[best][select],
             out / "final.pt")
    return {"stage": best, "select": select, "val": float(summary[best][select]), "checkpoint": str(out / "final.pt")}
