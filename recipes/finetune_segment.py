"""2-D segmentation transfer: ViT + progressive-upsampling decoder (or a frozen dense probe) on your masks.

    python recipes/finetune_segment.py --config recipes/configs/finetune_segment.yaml \
        data.csv=data/pairs.csv data.num_classes=3 model.backbone=runs/demo_pretrain/backbone
    torchrun --nproc_per_node 2 recipes/finetune_segment.py --config ... (same arguments)
    deepspeed --num_accelerators 2 recipes/finetune_segment.py --deepspeed \
        --deepspeed_config recipes/configs/ds_zero2.json --config ... (same arguments)
    # data.csv: image,mask[,patient] (PNG/DICOM pairs, or NIfTI volumes sliced along data.axis)
    # model.protocol=probe: frozen encoder, dense multi-block probe; =frozen: frozen encoder + decoder
    # --resume continues the run in output.dir from its newest checkpoint

Writes output.dir/{config.yaml, metrics.json, best.pt, head.pt (architecture record + every weight:
`medssl.heads.build.load_head("head.pt")` rebuilds the model without the backbone's source; runs written
before this name wrote model.pt, which `load_head(output.dir)` still reads), checkpoints/}.
"""

from __future__ import annotations

import sys

import numpy as np

from medssl.data.datasets import SegmentationDataset, split_by_group
from medssl.heads.build import head_record
from medssl.heads.fit import dice_score, predict, random_hflip
from medssl.heads.segment import dice_ce_loss
from medssl.heads.transfer import finish_transfer, start_transfer, train_transfer
from medssl.metrics.segmentation import SegmentationMeter
from medssl.train.engine import run_facts
from medssl.train.launch import run_recipe

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
    d, m = cfg["data"], cfg["model"]
    out = start_transfer(cfg, dist)
    full = SegmentationDataset.from_csv(d["csv"], d["img_size"], d["num_classes"], d["in_chans"], d["axis"],
                                        d["min_foreground"])
    split = np.array(split_by_group(full.groups, d["fractions"], d["split_seed"]))  # by volume / patient
    c = d["num_classes"]
    record = head_record("segment", m["protocol"], m["backbone"], c, d["img_size"], d["in_chans"],
                         blocks=m["blocks"], decoder_dim=m["decoder_dim"], drop_path=m["drop_path"])
    splits = {}
    for name in ("train", "val", "test"):
        part = full.subset(np.flatnonzero(split == name))
        splits[name] = (part.images, part.masks)
    augment = None if m["protocol"] == "probe" else random_hflip
    run = train_transfer(cfg, record, splits, dice_ce_loss, dice_score(c), dist, ds_config, resume, augment=augment,
                         best_extra={"record": record})
    logits, y = predict(run.model, run.sets["test"], batch_size=run.fit_config.batch_size, device=dist.device)
    meter = SegmentationMeter(c)
    meter.update(logits.argmax(1), y)
    report = {"best_val_dice": run.fit.best_score, "best_epoch": run.fit.best_epoch,
              "samples": {k: len(v) for k, v in run.sets.items()}, "test": meter.report(),
              **run_facts(run.fit.engine)}
    finish_transfer(run, report, dist)
    if dist.is_main:
        print(f"test: Dice {report['test']['dice']:.3f} IoU {report['test']['iou']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
