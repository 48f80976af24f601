"""One table cell = one (task, backbone, protocol, label fraction, seed) training run, cached by key.

Protocols: "probe" (frozen encoder: multi-block `LinearProbe` / `DenseProbe`), "finetune" (whole
ViT with layer-wise lr decay: `FineTuneClassifier` / `ViTSegmenter`), "scratch" (the CNN baselines:
timm ResNet-18 / small U-Net, trained from random init; `medssl.heads.build.cnn_model`). A pretrained CNN row
(`kind` "cnn_pretrained": a backbone folder of a SparK-pretrained ResNet) fine-tunes that ResNet exactly as the CNN
baseline trains (the "scratch" hyper-parameters and learning-rate grid, the same seeded start for its fresh
classifier): classification and detection; a U-Net has no ResNet encoder, so it has no segmentation cells.
Volume tasks (`TaskData.spatial_dims == 3`) take 3-D backbones only (a 2-D one is refused, and the reverse): the
ViT rows fine-tune MONAI's UNETR on the backbone (`medssl.heads.segment3d.build_unetr`) to segment and
`medssl.heads.classify3d.VolumeClassifier` to classify (kNN: `VolumeProbe`'s frozen features); the CNN rows
are the same U-Net in 3-D and a small 3-D ResNet (`classify3d.resnet3d`).
Every row of a task is trained on the same label subset (drawn from the seed), with the same schedule per
protocol, and selected on the same validation split; the test split is scored once, with the best-on-validation weights.

Cache: a finished cell is stored as `cells/<key>.json` and reused while its key is unchanged; the key, the
fingerprint of the code that computes the cell and the commit it records: `benchmarks.provenance`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks.provenance import cell_key
from benchmarks.tasks import TaskData
from medssl import hub
from medssl.heads.build import build_head, cnn_model, head_record
from medssl.heads.classify import class_weights, layer_decay_groups
from medssl.heads.features import FeatureCache, subset
from medssl.heads.fit import FitConfig, auc_score, dice_score, fit, predict, random_hflip
from medssl.heads.segment import dice_ce_loss
from medssl.metrics.classification import classification_report
from medssl.metrics.segmentation import SegmentationMeter

_SIZE_NAMES = {192: "Ti", 384: "S", 768: "B", 1024: "L", 1280: "H"}
FEATURES = FeatureCache(4)  # frozen-encoder features, shared by the probe and kNN cells of a backbone
_LOADED: dict[str, tuple[dict[str, Any], nn.Module]] = {}  # the last pretrained backbone (copied for every cell)
TWIN_ARCH = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")  # a random-init twin's identity
_IDENTITY: dict[tuple, str] = {}  # backbone files (path, size, mtime) -> content identity


@dataclass
class Backbone:
    """A table row's model: a ViT source (path or registry name), a random-init twin, or a CNN."""

    kind: str  # "vit" | "vit_random" | "cnn" | "cnn_pretrained"
    source: str  # load_backbone source; vit_random: a JSON architecture (`twin_source`); cnn: "resnet18" / "unet"
    pretraining: str
    data: str
    label: str  # Backbone column, e.g. "ViT-Ti/4"
    epochs: float | None = None  # pretraining epochs (0 for random init), for the pretraining-length curve
    fractions: tuple[float, ...] | None = None  # the label budgets this row runs (None: all of the task's)
    pool: str | None = None  # the shard folder it was pretrained on (pool.json inside), checked against test sets

    def runs(self, fraction: float) -> bool:
        """Whether this row has a cell at label budget `fraction`."""
        return self.fractions is None or any(math.isclose(fraction, f) for f in self.fractions)

    def identity(self) -> str:
        """What makes the weights what they are (for the cache key): kind, source and the weights' content.

        A pretrained source is named by the SHA-256 of its files' bytes (a folder: every file in it), so a
        retrained backbone at the same path gets new cells and a copied one keeps its cells.
        """
        p = Path(self.source)
        if self.kind not in ("vit", "cnn_pretrained") or not p.exists():
            return f"{self.kind}:{self.source}"
        from medssl.data.holdout import file_sha256

        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        stamp = tuple((str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in files)
        if stamp not in _IDENTITY:  # hashed once per process while the files stay as they are
            _IDENTITY[stamp] = f"{self.kind}:" + ",".join(f"{q.name}:{file_sha256(q)}" for q in files)
        return _IDENTITY[stamp]


def twin_source(record: dict[str, Any]) -> str:
    """A random-init twin's `Backbone.source`: the JSON of an architecture record's `TWIN_ARCH` entries (and
    `spatial_dims: 3` for a 3-D backbone)."""
    arch: dict[str, Any] = {k: float(record[k]) if k == "mlp_ratio" else int(record[k]) for k in TWIN_ARCH}
    if record.get("spatial_dims", 2) == 3:
        arch["spatial_dims"] = 3
    return json.dumps(arch, sort_keys=True)


def backbone_dims(bb: Backbone) -> int | None:
    """2 or 3: the inputs a ViT row takes (images or volumes); None for the CNN, built for the task's; 2 for a
    pretrained (2-D) ResNet."""
    if bb.kind == "cnn":
        return None
    if bb.kind == "cnn_pretrained":
        return 2
    record = json.loads(bb.source) if bb.kind == "vit_random" else hub.backbone_record(bb.source)
    return int(record.get("spatial_dims", 2))


def check_dims(task: TaskData, bb: Backbone) -> None:
    """Refuse a row whose backbone takes inputs of other dimensions than the task's (ValueError)."""
    dims, want = backbone_dims(bb), task.spatial_dims
    if dims not in (None, want):
        what = {2: "images (2-D)", 3: "volumes (3-D)"}
        raise ValueError(f"backbone {bb.label} ({bb.source}) takes {what[dims]}, task {task.name} holds "
                         f"{what[want]}: a {want}-D task needs a {want}-D backbone"
                         + (" (pretrained on `build_shards --dims 3` volumes)" if want == 3 else ""))


def vit_label(arch: dict[str, Any]) -> str:
    """Short name such as ViT-Ti/4."""
    return f"ViT-{_SIZE_NAMES.get(arch['embed_dim'], arch['embed_dim'])}/{arch['patch_size']}"


def vit_backbone(bb: Backbone, img_size: int, in_chans: int = 1) -> tuple[dict[str, Any], nn.Module | None]:
    """The row's ViT: its architecture record (`medssl.hub.backbone_record`) and a fresh copy of the pretrained
    ViT (loaded once per process, whichever cell comes first: the cells' random draws do not depend on it), or
    the random-init twin's record and None (the head builds it, from the cell's seed)."""
    if bb.kind == "vit":
        key = f"{bb.identity()}|{img_size}|{in_chans}"
        if key not in _LOADED:
            _LOADED.clear()  # keep one backbone in memory
            with torch.random.fork_rng(devices=[]):  # loading builds a ViT first: never draw from the cell's seed
                _LOADED[key] = (hub.backbone_record(bb.source), hub.load_backbone(bb.source, img_size=img_size,
                                                                                  in_chans=in_chans))
        record, vit = _LOADED[key]
        return record, copy.deepcopy(vit)
    arch = json.loads(bb.source)
    record = {**arch, "img_size": [img_size] * arch.get("spatial_dims", 2), "in_chans": in_chans,
              "meta": {"source": "random initialisation"}, "where": "random init"}
    return record, None


def rarest_class(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per mask [N, H, W], the rarest class it shows (rarest by the number of masks showing it; ties: the lower
    index): the stratum a segmentation label subset is drawn by, so that a small budget still shows every class
    the training split has, where it can (one mask per stratum at least)."""
    shows = torch.stack([(masks == c).flatten(1).any(1) for c in range(num_classes)], 1)  # [N, C]
    freq = shows.sum(0).float()
    rank = torch.where(shows, freq.expand_as(shows), torch.full_like(shows, float("inf"), dtype=torch.float))
    return rank.argmin(1)


def label_subset(targets: torch.Tensor, fraction: float, seed: int, stratify: bool) -> np.ndarray:
    """Indices of the labelled training subset: a fraction (<= 1) or a count (> 1) of samples.

    Stratified subsets give each class (for segmentation: each `rarest_class` stratum) its share, at least one
    sample.
    """
    n = len(targets)
    k = n if fraction == 1 else (round(fraction * n) if fraction < 1 else int(fraction))
    if not 1 <= k <= n:
        raise ValueError(f"label fraction {fraction} gives {k} of {n} training samples")
    rng = np.random.default_rng(10_000 + seed)
    if k == n:
        return np.arange(n)
    if not stratify:
        return np.sort(rng.choice(n, k, replace=False))
    y = targets.numpy()
    classes, counts = np.unique(y, return_counts=True)
    if k < len(classes):
        raise ValueError(f"label count {k} is smaller than the {len(classes)} classes")
    # largest-remainder shares of k, at least one per class, never more than a class holds
    share = k * counts / n
    per = np.minimum(np.maximum(1, np.floor(share).astype(int)), counts)
    for i in np.argsort(-(share - np.floor(share))):
        if per.sum() >= k:
            break
        per[i] += per[i] < counts[i]
    while per.sum() > k:
        per[np.argmax(per)] -= 1
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), int(m), replace=False)
                                   for c, m in zip(classes, per)]))


def _fit_config(hp: dict[str, Any], n_train: int, seed: int, device: str | None) -> FitConfig:
    bs = min(int(hp.get("batch_size", 32)), n_train)
    steps_per_epoch = max(1, n_train // bs)
    epochs = max(int(hp.get("epochs", 30)), math.ceil(int(hp.get("min_steps", 0)) / steps_per_epoch))
    return FitConfig(epochs=epochs, batch_size=bs, lr=float(hp.get("lr", 1e-3)),
                     weight_decay=float(hp.get("weight_decay", 0.05)),
                     warmup_epochs=float(hp.get("warmup_frac", 0.1)) * epochs, seed=seed, device=device,
                     eval_every=max(1, epochs // int(hp.get("evals", 20))), precision=str(hp.get("precision", "fp32")),
                     min_lr=float(hp.get("min_lr", 1e-6)))


def layer_decay(bb: Backbone, hp: dict[str, Any]) -> float:
    """Layer-wise lr decay of a fine-tuned ViT row: `layer_decay` for pretrained weights, `layer_decay_random`
    (default 1.0, i.e. none) at random init, whose lower layers hold nothing worth protecting: with 0.75 its
    patch embedding would train at ~0.02x the rate and the baseline would be handicapped."""
    if bb.kind == "vit_random":
        return float(hp.get("layer_decay_random", 1.0))
    return float(hp.get("layer_decay", 0.75))


def head_options(seg: bool, protocol: str, hp: dict[str, Any], depth: int) -> dict[str, Any]:
    """The `medssl.heads.build.head_record` options of a ViT row, every one from the protocol's config section
    (`pool`, `blocks`, `decoder_dim`, `drop_path`) or the benchmark's own default."""
    if protocol == "probe":
        k = min(int(hp.get("blocks", 4)), depth)
        return {"blocks": k} if seg else {"pool": hp.get("pool", "cls+mean"), "probe_blocks": k}
    if protocol == "finetune":
        dp = float(hp.get("drop_path", 0.1))
        if seg:
            return {"blocks": int(hp.get("blocks", 4)), "decoder_dim": int(hp.get("decoder_dim", 64)), "drop_path": dp}
        return {"pool": "mean", "drop_path": dp}
    raise ValueError(f"unknown protocol {protocol!r} for a ViT (use probe or finetune)")


def _build(task: TaskData, bb: Backbone, protocol: str, hp: dict[str, Any], img_size: int
           ) -> tuple[nn.Module, list[dict] | None]:
    c, seg, dims = task.num_classes, task.kind == "segmentation", task.spatial_dims
    check_dims(task, bb)
    if bb.kind == "cnn":
        if protocol != "scratch":
            raise ValueError(f"CNN baselines train from scratch only, not {protocol!r}")
        return cnn_model("segment" if seg else "classify", c, dims, **hp), None
    if bb.kind == "cnn_pretrained":
        if protocol != "finetune" or seg:
            raise ValueError(f"a pretrained CNN row fine-tunes a classifier (protocol finetune), not {protocol!r} "
                             f"on a {task.kind} task")
        # built as the baseline's timm.create_model (the same draws: the same fresh classifier), then loaded
        return hub.load_backbone(bb.source, num_classes=c, in_chans=1), None
    record, vit = vit_backbone(bb, img_size)
    if dims == 3 and seg:
        model = _unetr(record, vit, protocol, c, hp)
    elif dims == 3:  # on MONAI's ViT (the pretrained copy, or the twin built from the cell's seed)
        if protocol not in ("finetune", "probe"):
            raise ValueError(f"3-D ViT rows fine-tune or probe (kNN reads the probe's features), not {protocol!r}")
        options = {"probe_blocks": min(int(hp.get("blocks", 4)), record["depth"])} if protocol == "probe" else {}
        model = build_head(head_record("classify", protocol, record, c, img_size, **options), vit)
    else:
        options = head_options(seg, protocol, hp, record["depth"])
        model = build_head(head_record("segment" if seg else "classify", protocol, record, c, img_size, **options),
                           vit)
    if protocol == "finetune":
        groups = layer_decay_groups(model, record["depth"], float(hp.get("lr", 1e-3)),
                                    float(hp.get("weight_decay", 0.05)), layer_decay(bb, hp))
        return model, groups
    return model, None


def _unetr(record: dict[str, Any], vit: nn.Module | None, protocol: str, num_classes: int, hp: dict[str, Any]
           ) -> nn.Module:
    """A 3-D ViT row's model: MONAI's UNETR on the row's ViT (the pretrained copy, or the twin built here from
    the cell's seed); `unetr_feature_size` (default 16) sets the decoder width. Fine-tuning only."""
    from medssl.heads.segment3d import build_unetr
    from medssl.models.monai_vit import build_monai_vit

    if protocol != "finetune":
        raise ValueError(f"3-D ViT rows fine-tune UNETR (protocol finetune), not {protocol!r}")
    if vit is None:  # the random-init twin: MONAI's ViT of the record's architecture
        vit = build_monai_vit(record)
        vit.medssl_cfg = {**record, "cls_token": False, "loaded_from": "random init"}
    return build_unetr(vit, num_classes, feature_size=int(hp.get("unetr_feature_size", 16)))


def task_features(task: TaskData, bb: Backbone, model: nn.Module, seed: int, norm: tuple[float, float]
                  ) -> dict[str, TensorDataset]:
    """Every split through a frozen probe's `features()`, cached per backbone, task, blocks and pooling (the probe
    and kNN protocols share them; a random-init backbone's features depend on the seed)."""
    mean, std = norm
    key = cell_key(bb=bb.identity(), task=task.name, info=task.summary(), blocks=model.indices,
                   pool=getattr(model, "pool", None), norm=norm, seed=seed if bb.kind == "vit_random" else None)
    return FEATURES.get(key, model, {k: TensorDataset((x - mean) / std, y) for k, (x, y) in task.splits.items()})


def evaluate_outputs(task: TaskData, out: torch.Tensor, tgt: torch.Tensor) -> dict[str, Any]:
    """Metrics of the test split from model outputs (logits)."""
    if task.kind == "segmentation":
        m = SegmentationMeter(task.num_classes)
        m.update(out.argmax(1), tgt)
        return m.report()
    return classification_report(tgt.numpy(), out.softmax(1).numpy(), task.num_classes)


def lr_grid(hp: dict[str, Any]) -> list[float]:
    """The learning rates a cell tries (`lr_grid`, else the single `lr`); the best on validation is kept."""
    grid = hp.get("lr_grid") or [hp.get("lr", 1e-3)]
    return [float(v) for v in grid]


def _finite(score: float) -> float:
    """A validation score for comparisons: NaN (nothing learned, or an empty class) ranks below everything."""
    return -math.inf if math.isnan(score) else score


def run_cell(task: TaskData, bb: Backbone, protocol: str, fraction: float, seed: int, hp: dict[str, Any],
             img_size: int, norm: tuple[float, float] = (0.5, 0.25), device: str | None = None) -> dict[str, Any]:
    """Train and evaluate one cell; returns test metrics and run facts.

    Every learning rate of `lr_grid(hp)` trains the same label subset from the same seeded start; the one
    with the best validation score is kept (ties: the first) and only its weights are scored on test. The
    "knn" protocol trains nothing: frozen features, `k` chosen on validation (`medssl.heads.knn`).
    """
    seg = task.kind == "segmentation"
    xtr, ytr = task.splits["train"]
    keep = torch.from_numpy(label_subset(rarest_class(ytr, task.num_classes) if seg else ytr, fraction, seed,
                                         stratify=True))
    mean, std = norm
    if protocol == "knn":
        return _knn_cell(task, bb, keep, seed, hp, img_size, norm)

    def ds(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
        return TensorDataset((x - mean) / std, y)

    score = dice_score(task.num_classes) if seg else auc_score
    if seg:
        def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return dice_ce_loss(out, y)
    else:
        w = class_weights(ytr[keep].numpy(), task.num_classes) if hp.get("class_weights") else None

        def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out.float(), y, weight=None if w is None else w.to(out.device))
    augment = random_hflip if hp.get("hflip", True) and protocol != "probe" else None
    images = None if protocol == "probe" else (ds(xtr[keep], ytr[keep]), ds(*task.splits["val"]),
                                                ds(*task.splits["test"]))  # normalised once for every rate
    best: dict[str, Any] | None = None
    val_by_lr: dict[str, float] = {}
    seconds = 0.0
    for lr in lr_grid(hp):
        torch.manual_seed(seed)  # the head / random-init weights depend on the seed, not on the lr
        model, groups = _build(task, bb, protocol, {**hp, "lr": lr}, img_size)
        probe = protocol == "probe"
        if probe:  # the head trains on frozen features, computed once per backbone and task
            feats = task_features(task, bb, model, seed, norm)
            train, val, test, trained = subset(feats["train"], keep), feats["val"], feats["test"], model.head
        else:
            (train, val, test), trained = images, model
        cfg = _fit_config({**hp, "lr": lr}, len(train), seed, device)
        res = fit(model, None if probe else train, None if probe else val, loss_fn, score, cfg, param_groups=groups,
                  augment=augment, features=(train, val) if probe else None)
        seconds += res.seconds
        val_by_lr[f"{lr:g}"] = res.best_score
        if best is None or _finite(res.best_score) > _finite(best["res"].best_score):
            best = {"lr": lr, "res": res, "trained": trained, "test": test, "cfg": cfg, "n_train": len(train)}
    assert best is not None
    eval_bs = 64 if task.spatial_dims == 2 else best["cfg"].batch_size  # volumes: [B, C, S, S, S] logits
    out, tgt = predict(best["trained"], best["test"], batch_size=eval_bs)
    res = best["res"]
    return {"metrics": evaluate_outputs(task, out, tgt), "val_score": res.best_score, "best_epoch": res.best_epoch,
            "epochs": best["cfg"].epochs, "lr": best["lr"], "val_by_lr": val_by_lr, "n_train": best["n_train"],
            "seconds": round(seconds, 1),
            "params_trained": sum(p.numel() for p in best["trained"].parameters() if p.requires_grad)}


def _knn_cell(task: TaskData, bb: Backbone, keep: torch.Tensor, seed: int, hp: dict[str, Any], img_size: int,
              norm: tuple[float, float]) -> dict[str, Any]:
    """kNN on frozen features (the probe's `features()`: cls + mean of the last `blocks` blocks), k on val."""
    from medssl.heads.knn import knn_probs, select_k

    if task.kind != "classification":
        raise ValueError(f"the knn protocol classifies; task {task.name} is {task.kind}")
    torch.manual_seed(seed)
    model, _ = _build(task, bb, "probe", hp, img_size)
    feats = task_features(task, bb, model, seed, norm)
    xtr, ytr = subset(feats["train"], keep).tensors
    (xval, yval), (xtest, _) = feats["val"].tensors, feats["test"].tensors
    t = float(hp.get("temperature", 0.07))
    k, by_k = select_k(xtr, ytr, xval, yval, task.num_classes, auc_score, hp.get("k_grid", (1, 3, 5, 10, 20)), t)
    probs = knn_probs(xtr, ytr, xtest, k, task.num_classes, t)
    return {"metrics": evaluate_outputs(task, probs.log(), task.splits["test"][1]), "val_score": by_k[k], "k": k,
            "val_by_k": {str(j): v for j, v in by_k.items()}, "n_train": len(xtr), "best_epoch": None,
            "epochs": 0, "seconds": 0.0, "params_trained": 0}


def run_detection_cell(task: Any, bb: Backbone, protocol: str, fraction: float, seed: int, hp: dict[str, Any],
                       work: Path, device: str | None = None) -> dict[str, Any]:
    """Train the MedMask detector with the row's backbone on a label subset; score the held-out test split.

    CNN rows train a timm ResNet from scratch (`bb.source`, e.g. resnet18); ViT rows put the row's ViT
    (pretrained, loaded by the detector from `bb.source`, or its random-init twin, built from its architecture
    record under the stage's seed) under the simple feature pyramid.
    "finetune" trains the whole detector; "probe" freezes the ViT (its pyramid, the transformer and the heads
    train).
    """
    import shutil
    import time

    from benchmarks.tasks.lesions import detection_config
    from medssl.detection.evaluation import heldout_results
    from medssl.detection.stages import train_stage

    if bb.kind == "cnn" and protocol != "scratch":
        raise ValueError(f"CNN baselines train from scratch only, not {protocol!r}")
    if bb.kind == "cnn_pretrained" and protocol != "finetune":
        raise ValueError(f"a pretrained CNN row fine-tunes (protocol finetune), not {protocol!r}")
    if bb.kind not in ("cnn", "cnn_pretrained") and protocol not in ("finetune", "probe"):
        raise ValueError(f"unknown protocol {protocol!r} for a ViT detector backbone (use finetune or probe)")
    splits = dict(task.datasets())
    keep = label_subset(task.has_lesion(), fraction, seed, stratify=True)
    splits["train"] = splits["train"].subset(keep)
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)  # never score a checkpoint left by an interrupted run
    size, chans = int(task.config["data"]["max_size"]), int(task.config["data"]["in_chans"])
    if bb.kind == "cnn":
        backbone = {"backbone": "resnet", "backbone_name": bb.source, "backbone_weights": None,
                    "backbone_freeze": False}
    elif bb.kind == "cnn_pretrained":  # the CNN row's detector, its ResNet loaded from the folder and trained alike
        backbone = {"backbone": "resnet", "backbone_name": hub.backbone_config(bb.source)["architecture"],
                    "backbone_weights": bb.source, "backbone_freeze": False}
    else:  # the detector loads a pretrained row's weights itself; a twin is its seeded random init
        pretrained = bb.kind == "vit"
        backbone = {"backbone": "vit", "backbone_name": bb.source if pretrained else None,
                    "backbone_arch": None if pretrained else vit_backbone(bb, size, chans)[0], "img_size": size,
                    "backbone_freeze": protocol == "probe"}
    cfg = detection_config(task, backbone, hp, seed, len(splits["train"]), device, work)
    t0, init, res = time.time(), None, {}
    try:
        for stage in task.stages:
            res = train_stage(stage, cfg, work, init=init, splits=splits)
            init = res["checkpoint"]
        test = heldout_results(cfg, splits["train"], {task.stages[-1]: Path(init)})
    finally:
        shutil.rmtree(work, ignore_errors=True)  # checkpoints are large; the cell's JSON keeps the result
    if task.stages[-1] not in test:
        raise RuntimeError(f"{task.name}: no held-out split {cfg['eval']['test_split']!r} to score")
    metrics = {k.lower(): float(v) for k, v in test[task.stages[-1]].items()}
    best = res.get("best") or {}  # no best epoch when every validation score was NaN
    return {"metrics": metrics, "val_score": float(best.get(cfg["eval"]["select"], math.nan)),
            "best_epoch": res["best_epoch"], "epochs": cfg[task.stages[0]]["epochs"],
            "n_train": len(splits["train"]), "seconds": round(time.time() - t0, 1), "stages": task.stages,
            "random_boxes_test": {k.lower(): float(v) for k, v in test["random_boxes"].items()}}
