"""Tasks from the user's own data, declared in YAML (no code):

    - name: my_xray
      kind: classification
      source: data/xray.csv          # path,label[,patient] CSV, or a class-per-folder tree
      fractions: [0.7, 0.15, 0.15]   # train / val / test, split by patient (or by file)
    - name: my_seg
      kind: segmentation
      csv: data/pairs.csv            # image,mask[,patient]; NIfTI volumes are sliced (split by volume)
      num_classes: 3
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.tasks import TaskData
from medssl.data.datasets import (
    ClassificationDataset,
    SegmentationDataset,
    classification_records,
    read_csv,
    resolve_path,
    split_by_group,
)


def _check(spec: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in spec]
    if missing:
        raise ValueError(f"task {spec.get('name')!r}: missing {missing} (kind {spec.get('kind')!r})")


def custom_task(spec: dict[str, Any], img_size: int) -> TaskData:
    """Build a classification or segmentation task from a YAML entry (see the module docstring)."""
    _check(spec, ("name", "kind"))
    fractions = tuple(spec.get("fractions", (0.7, 0.15, 0.15)))
    seed = int(spec.get("split_seed", 0))
    if spec["kind"] == "classification":
        _check(spec, ("source",))
        recs, classes = classification_records(Path(spec["source"]))
        split = np.array(split_by_group([r.group for r in recs], fractions, seed))
        ds = ClassificationDataset(recs, img_size, in_chans=1)
        x, y, groups = ds.images, ds.labels, [r.group for r in recs]
        test_groups = {g for g, k in zip(groups, split) if k == "test"}
        test_files = sorted({str(r.path) for r in recs if r.group in test_groups})
    else:
        _check(spec, ("csv", "num_classes"))
        seg = SegmentationDataset.from_csv(Path(spec["csv"]), img_size, int(spec["num_classes"]), in_chans=1,
                                           axis=int(spec.get("axis", 0)))
        classes = list(spec.get("class_names") or [str(i) for i in range(int(spec["num_classes"]))])
        split = np.array(split_by_group(seg.groups, fractions, seed))
        x, y, groups = seg.images, seg.masks, seg.groups
        test_groups = {g for g, k in zip(groups, split) if k == "test"}
        csv_path = Path(spec["csv"])
        test_files = sorted({str(resolve_path(csv_path.parent, r["image"]))
                             for r in read_csv(csv_path, ("image", "mask"))
                             if (r.get("patient") or r["image"]) in test_groups})
    out = {k: (x[torch.from_numpy(split == k)], y[torch.from_numpy(split == k)]) for k in ("train", "val", "test")}
    grp = {k: [g for g, s in zip(groups, split) if s == k] for k in out}
    return TaskData(str(spec["name"]), spec["kind"], str(spec.get("data", spec.get("source", spec.get("csv")))),
                    len(classes), classes, out, grp, test_files=test_files)
