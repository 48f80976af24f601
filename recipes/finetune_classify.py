"""Classification transfer: linear / multi-block probe or full fine-tuning of a backbone on your images.

    python recipes/finetune_classify.py --config recipes/configs/finetune_classify.yaml \
        data.source=data/labels.csv model.backbone=runs/demo_pretrain/backbone
    torchrun --nproc_per_node 2 recipes/finetune_classify.py --config ... (same arguments)
    deepspeed --num_accelerators 2 recipes/finetune_classify.py --deepspeed \
        --deepspeed_config recipes/configs/ds_zero2.json --config ... (same arguments)
    # data.source: a class-per-folder tree or a path,label[,patient] CSV (split by patient)
    # model.protocol=probe for the frozen-encoder probe (model.probe_blocks=4: multi-block)
    # --resume continues the run in output.dir from its newest checkpoint

Writes output.dir/{config.yaml, metrics.json, best.pt, head.pt (architecture record + every weight:
`medssl.heads.build.load_head("head.pt")` rebuilds the model without the backbone's source), checkpoints/}.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from medssl.data.datasets import ClassificationDataset, classification_records, split_by_group
from medssl.heads.build import head_record
from medssl.heads.classify import balanced_sampler, class_weights
from medssl.heads.fit import auc_score, predict
from medssl.heads.transfer import finish_transfer, start_transfer, train_transfer
from medssl.metrics.classification import classification_report
from medssl.train.engine import run_facts
from medssl.train.launch import run_recipe

DEFAULTS = {
    "data": {"source": None, "img_size": 224, "in_chans": 1, "fractions": [0.7, 0.15, 0.15], "split_seed": 0},
    "model": {"backbone": "vit_small_patch16", "protocol": "finetune", "pool": "mean", "probe_blocks": 1,
              "drop_path": 0.1, "layer_decay": 0.75},
    "train": {"epochs": 50, "batch_size": 32, "lr": 5.0e-4, "weight_decay": 0.05, "warmup_epochs": 5,
              "precision": "auto", "seed": 0, "balance": "none", "device": None},
    "output": {"dir": "runs/finetune_classify"},
}


def main(argv: list[str] | None = None) -> int:
    """Entry point (python, torchrun or deepspeed)."""
    return run_recipe(__doc__, DEFAULTS, _run, argv,
                      required=("data", "source", "data.source is required: a class-per-folder tree or a "
                                "path,label[,patient] CSV"),
                      config_help="YAML config (recipes/configs/finetune_classify.yaml)")


def _run(cfg: dict, dist, ds_config: dict | None, resume: bool) -> int:
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    out = start_transfer(cfg, dist)
    records, classes = classification_records(d["source"])
    split = np.array(split_by_group([r.group for r in records], d["fractions"], d["split_seed"]))
    record = head_record("classify", m["protocol"], m["backbone"], len(classes), d["img_size"], d["in_chans"],
                         pool=m["pool"], probe_blocks=m["probe_blocks"], drop_path=m["drop_path"])
    splits = {}
    for name in ("train", "val", "test"):
        ds = ClassificationDataset([r for r, s in zip(records, split) if s == name], d["img_size"], d["in_chans"])
        splits[name] = (ds.images, ds.labels)
    y_train = splits["train"][1].numpy()
    weights = class_weights(y_train, len(classes)) if t["balance"] == "weights" else None
    sampler = balanced_sampler(y_train) if t["balance"] == "sampler" else None

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=None if weights is None else weights.to(logits.device))

    run = train_transfer(cfg, record, splits, loss_fn, auc_score, dist, ds_config, resume, sampler=sampler,
                         best_extra={"record": record, "classes": classes})
    logits, y = predict(run.model, run.sets["test"], device=dist.device)
    report = {"classes": classes, "best_val_score": run.fit.best_score, "best_epoch": run.fit.best_epoch,
              "samples": {k: len(v) for k, v in run.sets.items()},
              "test": classification_report(y.numpy(), logits.softmax(1).numpy(), len(classes)),
              **run_facts(run.fit.engine)}
    finish_transfer(run, report, dist, classes=classes)
    if dist.is_main:
        r = report["test"]
        print(f"test: accuracy {r['accuracy']:.3f} sensitivity {r['sensitivity']:.3f} AUC {r['auc']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
