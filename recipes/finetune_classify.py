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

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from medssl.config import dump_config
from medssl.data.datasets import ClassificationDataset, classification_records, split_by_group
from medssl.heads.build import build_head, head_record, init_head, save_head
from medssl.heads.classify import balanced_sampler, class_weights, layer_decay_groups
from medssl.heads.fit import FitConfig, auc_score, predict, train_supervised
from medssl.metrics.classification import classification_report
from medssl.train.engine import run_facts
from medssl.train.launch import run_recipe
from medssl.utils import seed_everything

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
    out = Path(cfg["output"]["dir"])
    if dist.is_main:
        dump_config(cfg, out / "config.yaml")
    records, classes = classification_records(d["source"])
    split = np.array(split_by_group([r.group for r in records], d["fractions"], d["split_seed"]))
    record = head_record("classify", m["protocol"], m["backbone"], len(classes), d["img_size"], d["in_chans"],
                         pool=m["pool"], probe_blocks=m["probe_blocks"], drop_path=m["drop_path"])
    seed_everything(t["seed"])  # the fresh head: the same in every process and every restart
    model = build_head(record)
    resuming = resume and any((out / "checkpoints").glob("*"))
    if not resuming:
        init_head(model, record)  # the pretrained weights, once; a resumed run has them in its checkpoint
    norm = model.backbone.medssl_cfg
    mean, std = (torch.tensor(norm[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    sets = {}
    for name in ("train", "val", "test"):
        ds = ClassificationDataset([r for r, s in zip(records, split) if s == name], d["img_size"], d["in_chans"])
        sets[name] = TensorDataset((ds.images - mean) / std, ds.labels)  # normalised like the pretraining
    y_train = sets["train"].tensors[1]
    groups = None
    if m["protocol"] == "finetune":
        groups = layer_decay_groups(model, len(model.backbone.blocks), t["lr"], t["weight_decay"], m["layer_decay"])
    weights = class_weights(y_train.numpy(), len(classes)) if t["balance"] == "weights" else None
    sampler = balanced_sampler(y_train.numpy()) if t["balance"] == "sampler" else None

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=None if weights is None else weights.to(logits.device))

    fc = FitConfig(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"],
                   warmup_epochs=t["warmup_epochs"], seed=t["seed"], device=t["device"])
    res = train_supervised(model, sets["train"], sets["val"], loss_fn, auc_score, fc, param_groups=groups,
                           sampler=sampler, dist=dist, out_dir=out, resume=resume, precision=t["precision"],
                           ds_config=ds_config, best_extra={"record": record, "classes": classes})
    logits, y = predict(model, sets["test"], device=dist.device)
    eng = res.engine
    report = {"classes": classes, "best_val_score": res.best_score, "best_epoch": res.best_epoch,
              "samples": {k: len(v) for k, v in sets.items()},
              "test": classification_report(y.numpy(), logits.softmax(1).numpy(), len(classes)),
              **run_facts(eng)}
    if dist.is_main:
        (out / "metrics.json").write_text(json.dumps(report, indent=1))
        save_head(out / "head.pt", model, record, classes=classes)
        r = report["test"]
        print(f"test: accuracy {r['accuracy']:.3f} sensitivity {r['sensitivity']:.3f} AUC {r['auc']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
