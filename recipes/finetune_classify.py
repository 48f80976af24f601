"""Classification transfer: linear / multi-block probe or full fine-tuning of a backbone on your images.

    python recipes/finetune_classify.py --config recipes/configs/finetune_classify.yaml \
        data.source=data/labels.csv model.backbone=runs/demo_pretrain/backbone
    # data.source: a class-per-folder tree or a path,label[,patient] CSV (split by patient)
    # model.protocol=probe for the frozen-encoder probe (model.probe_blocks=4: multi-block)

Writes output.dir/{config.yaml, metrics.json, head.pt (trained weights, weights_only-loadable)}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from medssl import load_backbone
from medssl.config import dump_config, load_config
from medssl.data.datasets import ClassificationDataset, classification_records, split_by_group
from medssl.heads.classify import (
    FineTuneClassifier,
    LinearProbe,
    balanced_sampler,
    class_weights,
    layer_decay_groups,
)
from medssl.heads.fit import FitConfig, auc_score, fit, predict
from medssl.metrics.classification import classification_report
from medssl.train.checkpoint import save_checkpoint

DEFAULTS = {
    "data": {"source": None, "img_size": 224, "in_chans": 1, "fractions": [0.7, 0.15, 0.15], "split_seed": 0},
    "model": {"backbone": "vit_small_patch16", "protocol": "finetune", "pool": "mean", "probe_blocks": 1,
              "drop_path": 0.1, "layer_decay": 0.75},
    "train": {"epochs": 50, "batch_size": 32, "lr": 5.0e-4, "weight_decay": 0.05, "warmup_epochs": 5,
              "bf16": False, "seed": 0, "balance": "none", "device": None},
    "output": {"dir": "runs/finetune_classify"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (recipes/configs/finetune_classify.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.source=labels.csv")
    args = parser.parse_args(argv)
    cfg = load_config(DEFAULTS, args.config, args.overrides)
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    if not d["source"]:
        raise ValueError("data.source is required: a class-per-folder tree or a path,label[,patient] CSV")
    out = Path(cfg["output"]["dir"])
    dump_config(cfg, out / "config.yaml")

    records, classes = classification_records(d["source"])
    split = np.array(split_by_group([r.group for r in records], d["fractions"], d["split_seed"]))
    backbone = load_backbone(m["backbone"], img_size=d["img_size"], in_chans=d["in_chans"])
    mean = torch.tensor(backbone.medssl_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(backbone.medssl_cfg["std"]).view(1, -1, 1, 1)
    sets = {}
    for name in ("train", "val", "test"):
        ds = ClassificationDataset([r for r, s in zip(records, split) if s == name], d["img_size"], d["in_chans"])
        sets[name] = TensorDataset((ds.images - mean) / std, ds.labels)  # normalised like the pretraining
    y_train = sets["train"].tensors[1]

    depth, groups = len(backbone.blocks), None
    if m["protocol"] == "probe":
        model = LinearProbe(backbone, len(classes), pool=m["pool"], num_blocks=m["probe_blocks"])
    elif m["protocol"] == "finetune":
        model = FineTuneClassifier(backbone, len(classes), drop_path_rate=m["drop_path"], pool=m["pool"])
        groups = layer_decay_groups(model, depth, t["lr"], t["weight_decay"], m["layer_decay"])
    else:
        raise ValueError(f"model.protocol must be 'probe' or 'finetune', got {m['protocol']!r}")
    weights = class_weights(y_train.numpy(), len(classes)) if t["balance"] == "weights" else None
    sampler = balanced_sampler(y_train.numpy()) if t["balance"] == "sampler" else None

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=None if weights is None else weights.to(logits.device))

    fc = FitConfig(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"],
                   warmup_epochs=t["warmup_epochs"], bf16=t["bf16"], seed=t["seed"], device=t["device"])
    res = fit(model, sets["train"], sets["val"], loss_fn, auc_score, fc, param_groups=groups, sampler=sampler,
              log=print)
    logits, y = predict(model, sets["test"])
    report = {"classes": classes, "best_val_score": res.best_score, "best_epoch": res.best_epoch,
              "samples": {k: len(v) for k, v in sets.items()},
              "test": classification_report(y.numpy(), logits.softmax(1).numpy(), len(classes))}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    save_checkpoint(out / "head.pt", {"model": model.state_dict(), "classes": classes})
    r = report["test"]
    print(f"test: accuracy {r['accuracy']:.3f} sensitivity {r['sensitivity']:.3f} AUC {r['auc']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
