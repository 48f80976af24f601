"""Tasks from the user's own data, declared in YAML (no code):

    - name: my_xray
      kind: classification
      source: data/xray.csv          # path,label[,patient] CSV, or a class-per-folder tree
      fractions: [0.7, 0.15, 0.15]   # train / val / test, split by patient (or by file)
    - name: my_seg
      kind: segmentation
      csv: data/pairs.csv            # image,mask[,patient]; NIfTI volumes are sliced (split by volume)
      num_classes: 3
    - name: my_volumes               # 3-D: for 3-D backbones (run_all gives it 3-D rows only)
      kind: segmentation
      dims: 3
      csv: data/volumes.csv          # image,mask[,patient] NIfTI volumes (or DICOM series folders as images)
      num_classes: 3
      spacing: 2.0                   # isotropic mm (the pretraining pool's, e.g. build_shards --spacing)
      window: [-1000, 1000]          # CT: this HU window to [0, 1]; omit for MR (0.5-99.5 % of non-zero voxels)
      train_crops: 16                # seeded crops per training volume (half centred on foreground)

A 3-D task's samples are cubes of the table's `img_size`: crops of the training volumes, and the validation and
test volumes tiled whole (`benchmarks.tasks.volumes`); volumes are split by patient (or by file).
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
    if int(spec.get("dims", 2)) not in (2, 3):
        raise ValueError(f"task {spec['name']!r}: dims must be 2 or 3, got {spec['dims']!r}")
    if int(spec.get("dims", 2)) == 3:
        return _volume_task(spec, img_size, fractions, seed)
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


def _volume_task(spec: dict[str, Any], img_size: int, fractions: tuple[float, ...], seed: int) -> TaskData:
    """A 3-D segmentation task from `image,mask[,patient]` volume pairs (see the module docstring)."""
    from benchmarks.tasks.volumes import files_of, random_crops, read_pair, tiles
    from medssl.data.imaging import Window, apply_window, percentile_window

    _check(spec, ("csv", "num_classes"))
    if spec["kind"] != "segmentation":
        raise ValueError(f"task {spec['name']!r}: dims: 3 takes kind segmentation (3-D classification from YAML "
                         "is not supported yet; the built-in ct_liver_3d shows the rows)")
    csv_path, n = Path(spec["csv"]), int(spec["num_classes"])
    rows = read_csv(csv_path, ("image", "mask"))
    groups = [r.get("patient") or r["image"] for r in rows]
    split = split_by_group(groups, fractions, seed)
    window = spec.get("window")
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"train": [], "val": [], "test": []}
    grp: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, (row, group, role) in enumerate(zip(rows, groups, split)):
        image = resolve_path(csv_path.parent, row["image"])
        vol, labels, _ = read_pair(image, resolve_path(csv_path.parent, row["mask"]), float(spec.get("spacing", 2.0)))
        if labels.min() < 0 or labels.max() >= n:
            raise ValueError(f"{row['mask']}: labels {labels.min()}..{labels.max()} outside 0..{n - 1} "
                             f"(num_classes {n})")
        win = Window("window", *map(float, window)) if window else percentile_window(vol, nonzero=True)
        unit = apply_window(vol, win)  # [Z, Y, X] in [0, 1]
        x, y = (random_crops(unit, labels, img_size, int(spec.get("train_crops", 16)), seed * 1000 + i)  # row's seed
                if role == "train" else tiles(unit, labels, img_size))  # [K, 1, c, c, c], [K, c, c, c]
        parts[role].append((x, y))
        grp[role] += [group] * len(x)
    if not all(parts.values()):
        raise ValueError(f"task {spec['name']!r}: {len(rows)} volumes leave a split empty; list at least 3 "
                         f"(fractions {list(fractions)})")
    out = {k: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for k, v in parts.items()}
    classes = list(spec.get("class_names") or [str(i) for i in range(n)])
    test_files = sorted({str(f) for r, s in zip(rows, split) if s == "test"  # a DICOM series: each of its files
                         for f in files_of(resolve_path(csv_path.parent, r["image"]))})
    return TaskData(str(spec["name"]), "segmentation", str(spec.get("data", spec["csv"])), n, classes, out, grp,
                    {"spacing_mm": float(spec.get("spacing", 2.0)), "crop": img_size,
                     "train_crops_per_volume": int(spec.get("train_crops", 16)),
                     "window": list(window) if window else "0.5-99.5 percentile of non-zero voxels"},
                    test_files=test_files)
