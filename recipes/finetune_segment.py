"""2-D segmentation transfer: ViT + progressive-upsampling decoder (or a frozen dense probe) on your masks.

    python recipes/finetune_segment.py --config recipes/configs/finetune_segment.yaml \
        data.csv=data/pairs.csv data.num_classes=3 model.backbone=runs/demo_pretrain/backbone
    # data.csv: image,mask[,patient] (PNG/DICOM pairs, or NIfTI volumes sliced along data.axis)
    # model.protocol=probe: frozen encoder, dense multi-block probe; =frozen: frozen encoder + decoder

Writes output.dir/{config.yaml, metrics.json, model.pt (weights_only-loadable)}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from medssl import load_backbone
from medssl.config import dump_config, load_config
from medssl.data.datasets import SegmentationDataset, split_by_group
from medssl.heads.classify import layer_decay_groups
from medssl.heads.fit import FitConfig, dice_score, fit, predict, random_hflip
from medssl.heads.segment import DenseProbe, ViTSegmenter, dice_ce_loss
from medssl.metrics.segmentation import SegmentationMeter
from medssl.train.checkpoint import save_checkpoint

DEFAULTS = {
    "data": {"csv": None, "num_classes": 2, "img_size": 224, "in_chans": 1, "axis": 0, "min_foreground": 0.05,
             "fractions": [0.7, 0.15, 0.15], "split_seed": 0},
    "model": {"backbone": "vit_small_patch16", "protocol": "finetune", "blocks": 4, "decoder_dim": 128,
              "drop_path": 0.1, "layer_decay": 0.75},
    "train": {"epochs": 50, "batch_size": 16, "lr": 5.0e-4, "weight_decay": 0.05, "warmup_epochs": 5,
              "bf16": False, "seed": 0, "device": None},
    "output": {"dir": "runs/finetune_segment"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (recipes/configs/finetune_segment.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.csv=pairs.csv")
    args = parser.parse_args(argv)
    cfg = load_config(DEFAULTS, args.config, args.overrides)
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    if not d["csv"]:
        raise ValueError("data.csv is required: a CSV with columns image,mask[,patient]")
    out = Path(cfg["output"]["dir"])
    dump_config(cfg, out / "config.yaml")

    full = SegmentationDataset.from_csv(d["csv"], d["img_size"], d["num_classes"], d["in_chans"], d["axis"],
                                        d["min_foreground"])
    split = np.array(split_by_group(full.groups, d["fractions"], d["split_seed"]))  # by volume / patient
    backbone = load_backbone(m["backbone"], img_size=d["img_size"], in_chans=d["in_chans"])
    mean = torch.tensor(backbone.medssl_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(backbone.medssl_cfg["std"]).view(1, -1, 1, 1)
    sets = {}
    for name in ("train", "val", "test"):
        part = full.subset(np.flatnonzero(split == name))
        sets[name] = TensorDataset((part.images - mean) / std, part.masks)

    c, groups, augment = d["num_classes"], None, random_hflip
    if m["protocol"] == "probe":
        model, augment = DenseProbe(backbone, c, num_blocks=m["blocks"]), None
    elif m["protocol"] in ("finetune", "frozen"):
        model = ViTSegmenter(backbone, c, blocks=m["blocks"], decoder_dim=m["decoder_dim"],
                             freeze_backbone=m["protocol"] == "frozen", drop_path_rate=m["drop_path"])
        groups = layer_decay_groups(model, len(backbone.blocks), t["lr"], t["weight_decay"], m["layer_decay"])
    else:
        raise ValueError(f"model.protocol must be probe, frozen or finetune, got {m['protocol']!r}")
    fc = FitConfig(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"],
                   warmup_epochs=t["warmup_epochs"], bf16=t["bf16"], seed=t["seed"], device=t["device"])
    res = fit(model, sets["train"], sets["val"], dice_ce_loss, dice_score(c), fc, param_groups=groups,
              augment=augment, log=print)
    logits, y = predict(model, sets["test"], batch_size=fc.batch_size)
    meter = SegmentationMeter(c)
    meter.update(logits.argmax(1), y)
    report = {"best_val_dice": res.best_score, "best_epoch": res.best_epoch,
              "samples": {k: len(v) for k, v in sets.items()}, "test": meter.report()}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    save_checkpoint(out / "model.pt", {"model": model.state_dict()})
    print(f"test: Dice {report['test']['dice']:.3f} IoU {report['test']['iou']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
