"""2-D segmentation transfer: ViT + progressive-upsampling decoder (or a frozen dense probe) on your masks.

    python recipes/finetune_segment.py --config recipes/configs/finetune_segment.yaml \
        data.csv=data/pairs.csv data.num_classes=3 model.backbone=runs/demo_pretrain/backbone
    torchrun --nproc_per_node 2 recipes/finetune_segment.py --config ... (same arguments)
    deepspeed --num_accelerators 2 recipes/finetune_segment.py --deepspeed \
        --deepspeed_config recipes/configs/ds_zero2.json --config ... (same arguments)
    # data.csv: image,mask[,patient] (PNG/DICOM pairs, or NIfTI volumes sliced along data.axis)
    # model.protocol=probe: frozen encoder, dense multi-block probe; =frozen: frozen encoder + decoder
    # --resume continues the run in output.dir from its newest checkpoint

Writes output.dir/{config.yaml, metrics.json, best.pt, model.pt (architecture record + every weight:
`medssl.heads.build.load_head("model.pt")` rebuilds it without the backbone's source), checkpoints/}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from medssl.config import dump_config
from medssl.data.datasets import SegmentationDataset, split_by_group
from medssl.heads.build import build_head, head_record, init_head, save_head
from medssl.heads.classify import layer_decay_groups
from medssl.heads.fit import FitConfig, dice_score, predict, random_hflip, train_supervised
from medssl.heads.segment import dice_ce_loss
from medssl.metrics.segmentation import SegmentationMeter
from medssl.train.engine import run_facts
from medssl.train.launch import run_recipe
from medssl.utils import seed_everything

DEFAULTS = {
    "data": {"csv": None, "num_classes": 2, "img_size": 224, "in_chans": 1, "axis": 0, "min_foreground": 0.05,
             "fractions": [0.7, 0.15, 0.15], "split_seed": 0},
    "model": {"backbone": "vit_small_patch16", "protocol": "finetune", "blocks": 4, "decoder_dim": 128,
              "drop_path": 0.1, "layer_decay": 0.75},
    "train": {"epochs": 50, "batch_size": 16, "lr": 5.0e-4, "weight_decay": 0.05, "warmup_epochs": 5,
              "precision": "auto", "seed": 0, "device": None},
    "output": {"dir": "runs/finetune_segment"},
}


def main(argv: list[str] | None = None) -> int:
    """Entry point (python, torchrun or deepspeed)."""
    return run_recipe(__doc__, DEFAULTS, _run, argv,
                      required=("data", "csv", "data.csv is required: a CSV with columns image,mask[,patient]"),
                      config_help="YAML config (recipes/configs/finetune_segment.yaml)")


def _run(cfg: dict, dist, ds_config: dict | None, resume: bool) -> int:
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    out = Path(cfg["output"]["dir"])
    if dist.is_main:
        dump_config(cfg, out / "config.yaml")
    full = SegmentationDataset.from_csv(d["csv"], d["img_size"], d["num_classes"], d["in_chans"], d["axis"],
                                        d["min_foreground"])
    split = np.array(split_by_group(full.groups, d["fractions"], d["split_seed"]))  # by volume / patient
    c = d["num_classes"]
    record = head_record("segment", m["protocol"], m["backbone"], c, d["img_size"], d["in_chans"],
                         blocks=m["blocks"], decoder_dim=m["decoder_dim"], drop_path=m["drop_path"])
    seed_everything(t["seed"])  # the fresh head: the same in every process and every restart
    model = build_head(record)
    if not (resume and any((out / "checkpoints").glob("*"))):
        init_head(model, record)  # the pretrained weights, once; a resumed run has them in its checkpoint
    norm = model.backbone.medssl_cfg
    mean, std = (torch.tensor(norm[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    sets = {}
    for name in ("train", "val", "test"):
        part = full.subset(np.flatnonzero(split == name))
        sets[name] = TensorDataset((part.images - mean) / std, part.masks)
    groups, augment = None, random_hflip
    if m["protocol"] == "probe":
        augment = None
    else:
        groups = layer_decay_groups(model, len(model.backbone.blocks), t["lr"], t["weight_decay"], m["layer_decay"])
    fc = FitConfig(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"],
                   warmup_epochs=t["warmup_epochs"], seed=t["seed"], device=t["device"])
    res = train_supervised(model, sets["train"], sets["val"], dice_ce_loss, dice_score(c), fc, param_groups=groups,
                           augment=augment, dist=dist, out_dir=out, resume=resume, precision=t["precision"],
                           ds_config=ds_config, best_extra={"record": record})
    logits, y = predict(model, sets["test"], batch_size=fc.batch_size, device=dist.device)
    meter = SegmentationMeter(c)
    meter.update(logits.argmax(1), y)
    report = {"best_val_dice": res.best_score, "best_epoch": res.best_epoch,
              "samples": {k: len(v) for k, v in sets.items()}, "test": meter.report(), **run_facts(res.engine)}
    if dist.is_main:
        (out / "metrics.json").write_text(json.dumps(report, indent=1))
        save_head(out / "model.pt", model, record)
        print(f"test: Dice {report['test']['dice']:.3f} IoU {report['test']['iou']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
