"""The MedMask run config: stages and defaults (the reference's values; recipes/configs/*.yaml override them)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from medssl.detection.detr import DetrConfig

__all__ = ["CHECKPOINTS", "DEFAULTS", "STAGES", "THRESHOLDS", "detr_config"]

STAGES = ("source_only", "cross_domain_mae", "teaching")
CHECKPOINTS = ("best", "last")

# target_forward: forward the unlabelled target batch in train mode without a loss (BatchNorm statistics adapt:
#   the AdaBN control of the feature MAE); freeze_bn: BatchNorm layers stay in eval mode (statistics frozen; no
#   effect where they are frozen already, as with a pretrained ResNet-50).
# threshold (teaching): "fixed" (score_threshold), "mrt" (MRT's dynamic threshold from score_threshold, capped
#   at threshold_max) or "medmask" (MedMask's schedule); keep_better (teaching): validate the teacher and the
#   student and keep the better (MRT); pseudo_weight (teaching): weight of the pseudo-label loss (0: the teaching
#   stage without pseudo-labels, everything else alike: the control that isolates them).
_STAGE_DEFAULTS = {"epochs": 20, "lr": 2e-4, "lr_backbone": 2e-5, "lr_drop": None, "mae_weight": 0.0,
                   "mae_epochs": 0, "distill_weight": 0.0, "ema_alpha": 0.9996, "score_threshold": 0.3,
                   "nms_iou": 0.7, "retrain_every": 0, "source_weight": 1.0, "target_forward": False,
                   "freeze_bn": False, "threshold": "fixed", "threshold_max": 0.5, "keep_better": False,
                   "pseudo_weight": 1.0}
THRESHOLDS = ("fixed", "mrt", "medmask")

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
    # distill.mode: infonce | margin (image level, mean-pooled) | medmask (the reference) | object (region level);
    # margin null: the mode's reference value; regions / grid_offset: object mode (see medmask.ExpertDistiller)
    "distill": {"proj_dim": 128, "temperature": 0.1, "mode": "infonce", "margin": None, "regions": 8,
                "grid_offset": 1},
    # data.train_split may be a list of splits (concatenated, e.g. [train, target_truth] for an oracle).
    # eval.checkpoint: which checkpoint of a stage feeds the next stage and is handed over: "best" (by validation
    # eval.select on data.val_split, the labelled target split: the reference's rule) or "last" (no selection)
    # batch_size above is per rank: the global batch is batch_size x ranks x accum_iter.
    # ckpt_every: also checkpoint every this many steps (every epoch ends with one anyway; 0: epochs only)
    "train": {"weight_decay": 1e-4, "clip_grad": 0.1, "lr_linear_proj_mult": 0.1, "log_every": 50,
              "eval_every": 1, "precision": "auto", "accum_iter": 1, "ckpt_every": 0, "keep_checkpoints": 2},
    "eval": {"select": "R@0.3", "nms_iou": 0.1, "hit": "center", "iou_threshold": 0.5, "max_dets": 100,
             "overlays": 4, "random_boxes_per_image": 10, "test_split": "test",
             "pseudo_truth": None, "checkpoint": "best"},
    "source_only": {**_STAGE_DEFAULTS, "lr_drop": 16},
    "cross_domain_mae": {**_STAGE_DEFAULTS, "epochs": 10, "lr": 2e-5, "lr_backbone": 2e-6, "mae_weight": 1.0,
                         "distill_weight": 1.0},
    "teaching": {**_STAGE_DEFAULTS, "epochs": 10, "lr": 2e-5, "lr_backbone": 2e-6, "mae_weight": 1.0,
                 "mae_epochs": 2, "distill_weight": 1.0, "retrain_every": 4},
}


def detr_config(cfg: dict) -> DetrConfig:
    """The detector config of a run (``model`` section; ``in_chans`` follows ``data.in_chans``)."""
    m = {**cfg["model"], "in_chans": cfg["data"]["in_chans"]}
    return DetrConfig.from_dict(m)
