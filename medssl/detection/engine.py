"""MedMask training stages, evaluation (FROC R@k + COCO AP) and prediction for the Deformable DETR.

Stages, each starting from the previous stage's best checkpoint (chosen by validation R@0.3):

* ``source_only``: supervised detection on the labelled images.
* ``cross_domain_mae``: detection loss on labelled images + feature-MAE loss on unlabelled target
  images + expert contrastive distillation (when an embeddings folder is configured).
* ``teaching``: MRT-style EMA teacher; pseudo-labels from weak views (score threshold, class-agnostic
  NMS) supervise the student on strong views of the same images, alongside the labelled loss; feature
  MAE for the first ``mae_epochs``; every ``retrain_every`` epochs the student's non-decoder weights
  go back to their values at the start of the stage (selective retraining; the teacher keeps what it
  learnt). The teacher is the model evaluated and saved.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medssl.data.coco import build_dataset, collate_detection, make_transforms, read_image
from medssl.detection.criterion import SetCriterion
from medssl.detection.detr import DeformableDETR, DetrConfig, build_detector, postprocess
from medssl.detection.medmask import (
    EmbeddingStore,
    ExpertDistiller,
    FeatureMAE,
    ema_update,
    non_decoder_names,
    pseudo_labels,
    reset_non_decoder,
)
from medssl.metrics.detection import detection_summary, froc, froc_preprocess, random_boxes
from medssl.train.checkpoint import load_checkpoint, save_checkpoint
from medssl.train.optim import make_adamw

STAGES = ("source_only", "cross_domain_mae", "teaching")

_STAGE_DEFAULTS = {"epochs": 20, "lr": 2e-4, "lr_backbone": 2e-5, "lr_drop": None, "mae_weight": 0.0,
                   "mae_epochs": 0, "distill_weight": 0.0, "ema_alpha": 0.9996, "score_threshold": 0.3,
                   "nms_iou": 0.7, "retrain_every": 0, "source_weight": 1.0}

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "out": "runs/medmask",
    "data": {"dataset": "ddsm", "data_root": "data", "train_split": "train", "val_split": "val",
             "target_dataset": None, "target_split": "train", "max_size": 800, "sizes": None,
             "in_chans": 1, "mean": [0.5], "std": [0.25], "batch_size": 2, "workers": 2,
             "embeddings": None, "skip_missing_embeddings": False, "registry": None},
    "model": asdict(DetrConfig()),
    "mae": {"mask_ratio": 0.8, "layers": 2},
    "distill": {"proj_dim": 128, "temperature": 0.1, "mode": "infonce", "margin": 0.2},
    "train": {"weight_decay": 1e-4, "clip_max_norm": 0.1, "lr_linear_proj_mult": 0.1, "log_every": 50,
              "eval_every": 1},
    "eval": {"select": "R@0.3", "nms_iou": 0.1, "hit": "center", "iou_threshold": 0.5, "max_dets": 100,
             "overlays": 4, "random_boxes_per_image": 10, "test_split": "test"},
    "source_only": {**_STAGE_DEFAULTS, "lr_drop": 16},
    "cross_domain_mae": {**_STAGE_DEFAULTS, "epochs": 10, "lr": 2e-5, "lr_backbone": 2e-6, "mae_weight": 1.0,
                         "distill_weight": 1.0},
    "teaching": {**_STAGE_DEFAULTS, "epochs": 10, "lr": 2e-5, "lr_backbone": 2e-6, "mae_weight": 1.0,
                 "mae_epochs": 2, "distill_weight": 1.0, "retrain_every": 4},
}


# --------------------------------------------------------------------------------------------- data
class _Indexed(Dataset):
    """Adds the sample index to the target so that files (and embeddings) can be found again."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Any, dict]:
        img, t = self.ds[i]
        return img, {**t, "index": torch.tensor(i)}


def _transforms(cfg: dict, kind: str) -> Any:
    d = cfg["data"]
    return make_transforms(kind, max_size=d["max_size"], sizes=d["sizes"], in_chans=d["in_chans"],
                           mean=d["mean"], std=d["std"])


def _loader(ds: Dataset, cfg: dict, shuffle: bool, seed: int = 0) -> DataLoader:
    d = cfg["data"]
    return DataLoader(_Indexed(ds), batch_size=d["batch_size"], shuffle=shuffle, num_workers=d["workers"],
                      collate_fn=partial(collate_detection, pad_to_multiple=32), drop_last=False,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False)


def build_splits(cfg: dict) -> dict[str, Dataset]:
    """Labelled train (weak aug), val (no aug) and unlabelled target (weak+strong views) datasets."""
    d = cfg["data"]
    if d["registry"]:
        from medssl.data.coco import load_registry

        load_registry(d["registry"])
    target_name = d["target_dataset"] or d["dataset"]
    return {"train": build_dataset(d["dataset"], d["train_split"], d["data_root"], _transforms(cfg, "weak")),
            "val": build_dataset(d["dataset"], d["val_split"], d["data_root"], _transforms(cfg, "none")),
            "target": build_dataset(target_name, d["target_split"], d["data_root"],
                                    _transforms(cfg, "weak_strong"))}


def _device(cfg: dict) -> torch.device:
    """The run's device: ``cfg["device"]``, where ``auto`` means CUDA when present, else CPU."""
    if cfg["device"] == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg["device"])


def _to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


# -------------------------------------------------------------------------------------------- model
def detr_config(cfg: dict) -> DetrConfig:
    """The detector config of a run (``model`` section; ``in_chans`` follows ``data.in_chans``)."""
    m = {**cfg["model"], "in_chans": cfg["data"]["in_chans"]}
    return DetrConfig.from_dict(m)


def build_medmask(cfg: dict, embed_dim: int | None) -> tuple[DeformableDETR, FeatureMAE, ExpertDistiller | None]:
    """Detector, feature-MAE decoder and (if the expert width is known) distiller."""
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
        dist = ExpertDistiller(mc.hidden_dim, embed_dim, dc["proj_dim"], dc["temperature"], dc["mode"], dc["margin"])
    return model, mae, dist


def param_groups_detr(model: DeformableDETR, extra: Sequence[nn.Module], lr: float, lr_backbone: float,
                      proj_mult: float) -> list[dict]:
    """Reference Deformable DETR groups: backbone at ``lr_backbone``, sampling offsets and reference
    point projections at ``lr * proj_mult``, everything else (and the MedMask modules) at ``lr``."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "proj": [], "rest": []}
    seen: set[int] = set()
    for name, p in itertools.chain(model.named_parameters(),
                                   *(m.named_parameters(prefix=f"extra{i}") for i, m in enumerate(extra))):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["proj"].append(p)
        else:
            groups["rest"].append(p)
    lrs = {"backbone": lr_backbone, "proj": lr * proj_mult, "rest": lr}
    return [{"params": ps, "lr": lrs[k], "base_lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


# --------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_dataset(model: DeformableDETR, ds: Dataset, cfg: dict, device: torch.device
                    ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Boxes (original pixels, after FROC NMS) and scores for every image of ``ds``, and its indices."""
    model.eval()
    ev = cfg["eval"]
    boxes, scores, order = [], [], []
    for images, mask, targets in _loader(ds, {**cfg, "data": {**cfg["data"], "workers": 0}}, shuffle=False):
        out = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets])  # [N, 2] (h, w)
        for det, t in zip(postprocess(out, sizes, ev["max_dets"]), targets):
            b, s = froc_preprocess(det["boxes"].cpu(), det["scores"].cpu(), iou_threshold=ev["nms_iou"])
            boxes.append(b)
            scores.append(s)
            order.append(int(t["index"]))
    return boxes, scores, order


def evaluate(model: DeformableDETR, ds: Dataset, cfg: dict, device: torch.device) -> tuple[dict, dict, list]:
    """FROC sensitivities and COCO AP on a labelled dataset.

    Returns:
        (flat summary ``{"R@0.3": ..., "AP50": ...}``, full ``froc`` result, per-image predictions).
    """
    boxes, scores, order = predict_dataset(model, ds, cfg, device)
    gts = [ds.gt_boxes_xyxy(i) for i in order]
    ids = [int(ds.images[i]["id"]) for i in order]
    ev = cfg["eval"]
    summary = detection_summary(boxes, scores, gts, coco_gt=ds.coco, image_ids=ids, hit=ev["hit"],
                                iou_threshold=ev["iou_threshold"])
    curve = froc(boxes, scores, gts, hit=ev["hit"], iou_threshold=ev["iou_threshold"])
    return summary, curve, list(zip(order, boxes, scores))


def random_baseline(train: Dataset, val: Dataset, cfg: dict, seed: int = 0) -> tuple[dict, dict]:
    """FROC/AP of boxes placed at random (sizes drawn from the training lesions) on the val images."""
    wh = [b[:, 2:] - b[:, :2] for b in (train.gt_boxes_xyxy(i) for i in range(len(train))) if len(b)]
    wh = np.concatenate(wh) if wh else np.array([[32.0, 32.0]])
    sizes = [(int(im["height"]), int(im["width"])) for im in val.images]
    boxes, scores = random_boxes(sizes, wh, boxes_per_image=cfg["eval"]["random_boxes_per_image"], seed=seed)
    gts = [val.gt_boxes_xyxy(i) for i in range(len(val))]
    ids = [int(im["id"]) for im in val.images]
    ev = cfg["eval"]
    summary = detection_summary(boxes, scores, gts, coco_gt=val.coco, image_ids=ids, hit=ev["hit"],
                                iou_threshold=ev["iou_threshold"])
    return summary, froc(boxes, scores, gts, hit=ev["hit"], iou_threshold=ev["iou_threshold"])


def operating_threshold(curve: dict, fps_per_image: float) -> float:
    """The lowest score threshold whose false positives per image stay within ``fps_per_image``."""
    c = curve["curve"]
    ok = np.isfinite(c["thresholds"]) & (c["fps_per_image"] <= fps_per_image + 1e-12)
    return float(c["thresholds"][ok].min()) if ok.any() else 1.0


def save_overlays(ds: Dataset, preds: list, out_dir: Path, n: int, score_threshold: float = 0.3) -> list[str]:
    """PNG overlays (ground truth vs predictions scoring >= ``score_threshold``), images with lesions first."""
    from medssl.viz import save_detections

    written = []
    with_lesions = [p for p in preds if len(ds.gt_boxes_xyxy(p[0]))] + [p for p in preds
                                                                        if not len(ds.gt_boxes_xyxy(p[0]))]
    for idx, boxes, scores in with_lesions[:n]:
        img = read_image(ds.file_of(idx))
        path = out_dir / f"{Path(ds.file_of(idx)).stem}.png"
        save_detections(path, img, gt_boxes=ds.gt_boxes_xyxy(idx), pred_boxes=boxes, pred_scores=scores,
                        score_threshold=score_threshold, title=f"{path.stem} (scores >= {score_threshold:.2f})")
        written.append(str(path))
    return written


# ----------------------------------------------------------------------------------------- training
def _embeddings(store: EmbeddingStore | None, ds: Dataset, targets: list[dict]) -> list[torch.Tensor | None]:
    if store is None:
        return [None] * len(targets)
    return [store.load(ds.file_of(int(t["index"]))) for t in targets]


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[nn.Parameter], clip: float) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}: lower the learning rate or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def train_stage(stage: str, cfg: dict, out_dir: str | Path, init: str | Path | None = None,
                splits: dict[str, Dataset] | None = None) -> dict[str, Any]:
    """Train one MedMask stage; writes ``out_dir/<stage>/{best.pt,last.pt,metrics.json,froc.png}``.

    Args:
        stage: one of ``source_only``, ``cross_domain_mae``, ``teaching``.
        cfg: resolved run config (see ``DEFAULTS``).
        out_dir: run folder.
        init: checkpoint to start from (the previous stage's best), or None.
        splits: datasets from :func:`build_splits` (built if None).

    Returns:
        ``{"best": summary of the best epoch, "best_epoch": int, "checkpoint": path, "history": [...]}``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    sc = cfg[stage]
    tc = cfg["train"]
    if int(sc["epochs"]) < 1:
        raise ValueError(f"{stage}.epochs must be >= 1, got {sc['epochs']}")
    torch.manual_seed(cfg["seed"])
    device = _device(cfg)
    splits = splits or build_splits(cfg)
    train_ds, val_ds, tgt_ds = splits["train"], splits["val"], splits["target"]
    store = None
    if sc["distill_weight"] > 0 and cfg["data"]["embeddings"]:
        store = EmbeddingStore(cfg["data"]["embeddings"], cfg["data"]["skip_missing_embeddings"])
        probes = (store.load(train_ds.file_of(i)) for i in range(len(train_ds)))
        probe = next((e for e in probes if e is not None), None)  # the expert width
        embed_dim = None if probe is None else probe.shape[-1]
        store.missing = 0
    else:
        embed_dim = None
    model, mae, dist = build_medmask(cfg, embed_dim)
    if init is not None:
        ck = load_checkpoint(init)
        model.load_state_dict(ck["model"])
        if "mae" in ck:
            mae.load_state_dict(ck["mae"])
        if dist is not None and "distiller" in ck and ck["distiller"] is not None:
            try:
                dist.load_state_dict(ck["distiller"])
            except RuntimeError:
                print(f"[{stage}] distiller weights in {init} do not fit; starting it afresh")
    model.to(device), mae.to(device)
    if dist is not None:
        dist.to(device)
    use_mae = sc["mae_weight"] > 0 and stage != "source_only"
    use_dist = dist is not None and sc["distill_weight"] > 0 and stage != "source_only"
    extra = [m for m, on in ((mae, use_mae), (dist, use_dist)) if on]
    groups = param_groups_detr(model, extra, sc["lr"], sc["lr_backbone"], tc["lr_linear_proj_mult"])
    opt = make_adamw(groups, lr=sc["lr"], weight_decay=tc["weight_decay"])
    params = [p for g in groups for p in g["params"]]
    crit = SetCriterion(model.cfg.num_classes).to(device)
    teacher, snapshot = None, None
    if stage == "teaching":
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if n in set(non_decoder_names(model))}
    train_loader = _loader(train_ds, cfg, shuffle=True, seed=cfg["seed"])
    need_target = stage != "source_only"
    tgt_loader = _loader(tgt_ds, cfg, shuffle=True, seed=cfg["seed"] + 1) if need_target else None
    sdir = Path(out_dir) / stage
    sdir.mkdir(parents=True, exist_ok=True)
    best: dict[str, Any] = {"score": -math.inf}
    history = []
    select = cfg["eval"]["select"]
    step = 0
    for epoch in range(sc["epochs"]):
        if sc["lr_drop"] is not None and epoch == sc["lr_drop"]:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * 0.1
        if stage == "teaching" and sc["retrain_every"] and epoch and epoch % sc["retrain_every"] == 0:
            n = reset_non_decoder(model, snapshot)
            print(f"[{stage}] epoch {epoch}: selective retraining reset {n} non-decoder tensors of the student")
        model.train(), mae.train()
        t0, sums, count = time.time(), {}, 0
        tgt_iter = iter(tgt_loader) if tgt_loader is not None else None
        for images, mask, targets in train_loader:
            images, mask, targets = images.to(device), mask.to(device), _to(targets, device)
            losses: dict[str, torch.Tensor] = {}
            out = model(images, mask)
            det = crit(out, targets)
            losses["det"] = sc["source_weight"] * sum(det.values())
            if use_dist and stage == "cross_domain_mae":
                losses["distill"] = sc["distill_weight"] * dist(out["hs"], _embeddings(store, train_ds, targets))
            if tgt_iter is not None:
                try:
                    views, tmask, ttargets = next(tgt_iter)
                except StopIteration:
                    tgt_iter = iter(tgt_loader)
                    views, tmask, ttargets = next(tgt_iter)
                weak, strong = (v.to(device) for v in views)
                tmask = tmask.to(device)
                if stage == "teaching":
                    with torch.no_grad():
                        pl = pseudo_labels(teacher(weak, tmask), sc["score_threshold"], sc["nms_iou"])
                    sout = model(strong, tmask)
                    losses["pseudo"] = sum(crit(sout, pl).values())
                    losses["n_pseudo"] = torch.tensor(float(sum(len(p["labels"]) for p in pl)))
                    if use_dist:
                        emb = _embeddings(store, tgt_ds, ttargets)
                        losses["distill"] = sc["distill_weight"] * dist(sout["hs"], emb)
                if use_mae and (stage != "teaching" or epoch < sc["mae_epochs"]):
                    mout = model(weak if stage == "teaching" else strong, tmask, mask_ratio=mae.mask_ratio)
                    losses["mae"] = sc["mae_weight"] * mae(mout["features"], mout["features"]["token_masks"])
            total = sum(v for k, v in losses.items() if k != "n_pseudo")
            _step(total, opt, params, tc["clip_max_norm"])
            if teacher is not None:
                ema_update(teacher, model, sc["ema_alpha"])
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
            step += 1
            if tc["log_every"] and step % tc["log_every"] == 0:
                msg = " ".join(f"{k}={float(v.detach()):.4f}" for k, v in losses.items())
                print(f"[{stage}] epoch {epoch} step {step} {msg}")
        record: dict[str, Any] = {"epoch": epoch, "seconds": round(time.time() - t0, 1),
                                  **{f"loss_{k}": round(v / max(count, 1), 4) for k, v in sums.items()}}
        if store is not None and store.missing:
            record["missing_embeddings"] = store.missing
        last_epoch = epoch == sc["epochs"] - 1
        if (epoch + 1) % tc["eval_every"] == 0 or last_epoch:
            eval_model = teacher if teacher is not None else model
            summary, curve, preds = evaluate(eval_model, val_ds, cfg, device)
            record["val"] = summary
            score = summary[select]
            if score > best["score"]:
                best = {"score": score, "epoch": epoch, "summary": summary, "curve": curve, "preds": preds}
                _save(sdir / "best.pt", eval_model, mae, dist, cfg, stage, epoch, summary)
        history.append(record)
        print(f"[{stage}] epoch {epoch} " + json.dumps({k: v for k, v in record.items() if k != "epoch"}), flush=True)
    _save(sdir / "last.pt", teacher if teacher is not None else model, mae, dist, cfg, stage, sc["epochs"] - 1,
          history[-1].get("val", {}))
    result = {"stage": stage, "best_epoch": best.get("epoch"), "best": best.get("summary"),
              "checkpoint": str(sdir / "best.pt"), "history": history}
    if "curve" in best:
        from medssl.viz import save_froc

        save_froc(sdir / "froc.png", best["curve"], title=f"{stage}: validation FROC (best epoch)")
        result["overlays"] = save_overlays(val_ds, best["preds"], sdir / "overlays", cfg["eval"]["overlays"],
                                           operating_threshold(best["curve"], 0.3))
    (sdir / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
    return {**result, "curve": best.get("curve")}


def _save(path: Path, model: nn.Module, mae: nn.Module, dist: nn.Module | None, cfg: dict, stage: str,
          epoch: int, metrics: dict) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "mae": mae.state_dict(),
                           "distiller": None if dist is None else dist.state_dict(),
                           "detector": asdict(model.cfg), "data": dict(cfg["data"]), "stage": stage,
                           "epoch": epoch, "metrics": {k: float(v) for k, v in metrics.items()}})


def run_stages(cfg: dict, stages: Iterable[str], init: str | Path | None = None) -> dict[str, Any]:
    """Run several stages in order, each from the previous one's best checkpoint, plus the random-box
    baseline on the same validation images; writes ``out/summary.json`` and ``out/froc_all.png``."""
    from medssl.viz import save_froc

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    splits = build_splits(cfg)
    base_summary, base_curve = random_baseline(splits["train"], splits["val"], cfg, seed=cfg["seed"])
    results: dict[str, Any] = {"random_boxes": base_summary}
    curves = {"random boxes": base_curve}
    for stage in stages:
        res = train_stage(stage, cfg, out, init=init, splits=splits)
        results[stage] = res["best"]
        init = res["checkpoint"]
        if res.get("curve") is not None:
            curves[stage] = res["curve"]
    save_froc(out / "froc_all.png", curves, title="validation FROC per stage vs random boxes")
    test = heldout_results(cfg, splits["train"], {s: out / s / "best.pt" for s in stages})
    summary_file = out / "summary.json"
    previous = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    merged = {**previous, **results}  # keep earlier stages of the same run folder
    if test:
        merged["test"] = {**previous.get("test", {}), **test}
        results["test"] = test
    summary_file.write_text(json.dumps(merged, indent=1, default=float))
    return results


def heldout_results(cfg: dict, train: Dataset, checkpoints: dict[str, Path]) -> dict[str, Any]:
    """Each stage's best checkpoint and the random boxes on the held-out ``eval.test_split`` (if present)."""
    from medssl.data.coco import DatasetNotFoundError

    name = cfg["eval"]["test_split"]
    if not name:
        return {}
    try:
        test = build_dataset(cfg["data"]["dataset"], name, cfg["data"]["data_root"], _transforms(cfg, "none"))
    except (DatasetNotFoundError, ValueError) as e:
        print(f"no held-out evaluation: {str(e).splitlines()[0]}")
        return {}
    if not hasattr(test, "gt_boxes_xyxy") or not hasattr(test, "coco"):
        return {}
    device = _device(cfg)
    out: dict[str, Any] = {"random_boxes": random_baseline(train, test, cfg, seed=cfg["seed"])[0]}
    for stage, ckpt in checkpoints.items():
        model, _ = load_detector(ckpt, device)
        out[stage] = evaluate(model, test, cfg, device)[0]
    return out


def load_detector(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[DeformableDETR, dict]:
    """Detector and its data config from a stage checkpoint."""
    ck = load_checkpoint(checkpoint)
    if "detector" not in ck or "model" not in ck:
        raise ValueError(f"{checkpoint}: not a medssl detector checkpoint (no 'detector'/'model' entries)")
    known = {f.name for f in fields(DetrConfig)}
    model = build_detector({k: v for k, v in ck["detector"].items() if k in known})
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), ck.get("data", {})


@torch.no_grad()
def predict_files(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                  score_threshold: float = 0.3, device: str = "cpu") -> list[dict[str, Any]]:
    """Detect lesions in image files or folders; writes ``predictions.json`` and one overlay PNG each.

    Returns:
        per image ``{"file", "boxes" (xyxy pixels), "scores"}`` (after FROC NMS, all scores kept).
    """
    from medssl.data.coco import IMAGE_EXTS
    from medssl.viz import save_detections

    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input image or folder not found: {item}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {[str(i) for i in inputs]}")
    model, data = load_detector(checkpoint, device)
    cfg = {"data": {**DEFAULTS["data"], **data}, "eval": DEFAULTS["eval"]}
    tf = _transforms(cfg, "none")
    out_dir = Path(out_dir)
    results = []
    for f in files:
        raw = read_image(f)  # [H, W] in [0, 1]
        img, _ = tf(torch.from_numpy(raw)[None], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
        out = model(img[None].to(device))
        (det,) = postprocess(out, torch.tensor([raw.shape]), cfg["eval"]["max_dets"])
        b, s = froc_preprocess(det["boxes"].cpu(), det["scores"].cpu(), iou_threshold=cfg["eval"]["nms_iou"])
        save_detections(out_dir / f"{f.stem}_pred.png", raw, pred_boxes=b, pred_scores=s,
                        score_threshold=score_threshold, title=f"{f.name} (scores >= {score_threshold})")
        results.append({"file": str(f), "boxes": b.round(1).tolist(), "scores": s.round(4).tolist()})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=1))
    return results
