"""Lesion detection on the MedMask demo set (synthetic mammograms), trained through the MedMask recipe.

The detector, its data pipeline, its stages and its scoring (FROC R@0.3 on the held-out test split, COCO
AP50) are those of `recipes/medmask_detect.py` (`medssl.detection.stages`), read from the recipe's config
(`recipes/configs/medmask_demo.yaml` by default) with the task's overrides. A table row only changes the
detector's backbone: the CNN baseline (a ResNet from scratch) or a ViT (random init or pretrained) under a
simple feature pyramid. Label fractions are drawn from the labelled training images, stratified by
whether an image holds a lesion.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DetectionTask:
    """A detection task: the resolved MedMask config plus its datasets (built once, shared by the cells).

    Attributes:
        name: task id.
        data: what the images are.
        config: resolved MedMask run config (`medssl.detection.config.DEFAULTS` + the recipe's YAML + overrides).
        stages: MedMask stages each cell trains, in order (the last one is scored).
        info: facts for the report.
    """

    name: str
    data: str
    config: dict[str, Any]
    stages: list[str]
    kind: str = "detection"
    num_classes: int = 1
    class_names: list[str] = field(default_factory=lambda: ["lesion"])
    info: dict[str, Any] = field(default_factory=dict)
    _splits: dict[str, Any] | None = None

    def datasets(self) -> dict[str, Any]:
        """train / val / target datasets of the recipe (built on first use)."""
        if self._splits is None:
            from medssl.detection.data import build_splits

            self._splits = build_splits(self.config)
        return self._splits

    def has_lesion(self) -> torch.Tensor:
        """Per training image: 1 if it holds a lesion (the stratum of the label subsets), else 0."""
        train = self.datasets()["train"]
        return torch.tensor([int(len(train.gt_boxes_xyxy(i)) > 0) for i in range(len(train))])

    @property
    def test_files(self) -> list[str]:
        """The images of the split the cells are scored on, checked against pretraining pools by content."""
        from medssl.data.coco import build_dataset

        d = self.config["data"]
        test = build_dataset(d["dataset"], self.config["eval"]["test_split"], d["data_root"])
        return [str(test.img_dir / im["file_name"]) for im in test.images]

    def summary(self) -> dict[str, Any]:
        """Counts per split and the task facts, for the resolved config and the report."""
        from medssl.data.coco import build_dataset

        ds = self.datasets()
        samples = {k: len(v) for k, v in ds.items() if k != "target"}
        d = self.config["data"]
        samples["test"] = len(build_dataset(d["dataset"], self.config["eval"]["test_split"], d["data_root"]))
        return {"kind": self.kind, "data": self.data, "classes": self.class_names, "samples": samples,
                "stages": self.stages, **self.info}


def lesion_detection(img_size: int, data_root: str | None = None, config: str | None = None,
                     stages: list[str] | None = None, max_size: int = 128, sizes: list[int] | None = None,
                     set: dict[str, Any] | None = None) -> DetectionTask:  # noqa: A002  (the recipe's word)
    """The MedMask demo set as a detection task (generated once if missing).

    Args:
        img_size: the table's image size (unused: detection has its own `max_size`).
        data_root: DATA_ROOT of the demo set (default `demo_data/mammo` under the project).
        config: MedMask YAML (default `recipes/configs/medmask_demo.yaml`).
        stages: MedMask stages per cell (default `["source_only"]`, the supervised stage).
        max_size: longest image side for training and evaluation.
        sizes: multi-scale training sizes (default: `[max_size]`).
        set: extra config overrides, `{"section.key": value}`.
    """
    del img_size
    from data_tools.demo_mammo import ensure_demo
    from medssl.config import load_config
    from medssl.detection.config import DEFAULTS, STAGES

    root = Path(data_root) if data_root else ROOT / "demo_data" / "mammo"
    demo = ensure_demo(root)
    path = Path(config) if config else ROOT / "recipes" / "configs" / "medmask_demo.yaml"
    if not path.is_absolute() and not path.is_file():  # relative to the project, from anywhere
        path = ROOT / path
    overrides = ["data.dataset=demo", f"data.data_root={root}", "data.target_split=target",
                 f"data.max_size={max_size}",
                 f"data.sizes=[{', '.join(str(s) for s in (sizes or [max_size]))}]",
                 f"data.embeddings={demo / 'embeddings'}",
                 *(f"{k}={v}" for k, v in (set or {}).items())]
    cfg = load_config(DEFAULTS, path, overrides)
    stages = list(stages or ["source_only"])
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"lesion_detection: unknown stages {bad}; use {STAGES}")
    demo_args = json.loads((demo / "_info.json").read_text()).get("args", {})
    # everything that decides a cell's result beyond its row / seed / schedule: part of the cell cache key
    version = hashlib.sha1(json.dumps({"config": cfg, "stages": stages, "demo": demo_args}, sort_keys=True,
                                      default=str).encode()).hexdigest()[:12]
    return DetectionTask(name="lesion_detection", data="synthetic mammograms (MedMask demo set)", config=cfg,
                         stages=stages, info={"config": str(path), "max_size": max_size,
                                              "scored_on": cfg["eval"]["test_split"], "version": version})


def detection_config(task: DetectionTask, backbone: dict[str, Any], hp: dict[str, Any], seed: int,
                     n_train: int, device: str | None, out: Path) -> dict[str, Any]:
    """The run config of one cell: the task's config with the row's backbone and the protocol's schedule.

    `hp`: `epochs` (at least), `min_steps` (raises the epochs of the first stage to reach it), `lr`,
    `lr_backbone`, `batch_size`.
    """
    cfg = copy.deepcopy(task.config)
    cfg["seed"], cfg["out"] = seed, str(out)
    cfg["device"] = device or "auto"
    cfg["model"].update(backbone)
    bs = int(hp.get("batch_size", cfg["data"]["batch_size"]))
    cfg["data"]["batch_size"] = bs
    first = task.stages[0]
    steps_per_epoch = max(1, int(np.ceil(n_train / bs)))
    epochs = max(int(hp.get("epochs", cfg[first]["epochs"])), -(-int(hp.get("min_steps", 0)) // steps_per_epoch))
    cfg[first]["epochs"] = epochs
    if cfg[first].get("lr_drop") is not None:  # keep the drop at the same fraction of the schedule
        cfg[first]["lr_drop"] = max(1, round(epochs * float(hp.get("lr_drop_frac", 0.8))))
    for key in ("lr", "lr_backbone"):
        if key in hp:
            cfg[first][key] = float(hp[key])
    cfg["eval"]["overlays"] = 0
    cfg["train"]["eval_every"] = max(1, epochs // int(hp.get("evals", epochs)))
    return cfg
