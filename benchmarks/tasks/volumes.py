"""Volume tasks' samples: seeded training crops and a deterministic tiling of whole volumes (3-D tasks).

A 3-D task trains on fixed cubes of `crop` voxels cut from its training volumes at seeded positions (the task's
seed, not a cell's: every row trains on the same crops; half of them centred on foreground) and is scored on
every voxel of its validation and test volumes once: each volume is padded evenly with air (image 0, background
label) to a multiple of the crop along every axis and cut into non-overlapping tiles, so the Dice over the tiles
is the Dice over the padded volume. A subject that both trains and validates is cut along its first (z) axis into
slabs with dropped planes between them (`slab_blocks`); `slab_roles` (the 2-D rule, per subject) and
`joint_slab_roles` (the 3-D rule, over all such subjects at once) say which slabs validate. `read_pair` reads an
image (NIfTI file or DICOM series folder) and its label map onto one LPS grid, optionally at an isotropic spacing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def files_of(image: Path) -> list[Path]:
    """The image's files: a NIfTI file, or every file of a DICOM series folder."""
    return sorted(p for p in image.iterdir() if p.is_file()) if image.is_dir() else [image]


def read_pair(image: Path, mask: Path, spacing: float | None = None
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image [Z, Y, X] float32, e.g. HU, label volume [Z, Y, X] int, voxel spacing (z, y, x) mm) in LPS order,
    the mask on the image's grid (nearest neighbour, by physical position); a DICOM series folder is read in
    slice-position order (GDCM), not in file-name order.

    With `spacing` (mm), both are then resampled to that isotropic grid by the shard builder's rule
    (`medssl.data.imaging.resample_volume`: the CT trilinear, the labels nearest).
    """
    import SimpleITK as sitk

    from medssl.data.imaging import resample_volume

    if image.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(image)))
        ct = reader.Execute()
    else:
        ct = sitk.ReadImage(str(image))
    ct = sitk.DICOMOrient(sitk.Cast(ct, sitk.sitkFloat32), "LPS")
    seg = sitk.ReadImage(str(mask))
    seg = sitk.Resample(sitk.Cast(seg, sitk.sitkUInt16), ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    hu, labels = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(seg).astype(np.int64)
    src = tuple(float(v) for v in ct.GetSpacing()[::-1])  # (z, y, x) mm
    if spacing is None:
        return hu, labels, src
    dst = (float(spacing),) * 3
    return (resample_volume(hu, src, dst),
            resample_volume(labels.astype(np.float32), src, dst, mode="nearest").round().astype(np.int64), dst)


def pad_to(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`volume` [D, H, W] padded evenly with zeros (air / background) to at least `shape`."""
    pads = [((max(s, n) - n) // 2, max(s, n) - n - (max(s, n) - n) // 2) for n, s in zip(volume.shape, shape)]
    return np.pad(volume, pads)


def tiles(image: np.ndarray, labels: np.ndarray, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every voxel of a volume once: images [T, 1, c, c, c] and labels [T, c, c, c], tiles in (z, y, x) order."""
    shape = tuple(-(-n // crop) * crop for n in image.shape)  # each axis up to a multiple of the crop
    x, y = pad_to(image, shape), pad_to(labels, shape)
    nz, ny, nx = (s // crop for s in shape)

    def cut(v: np.ndarray) -> np.ndarray:  # [nz*c, ny*c, nx*c] -> [nz*ny*nx, c, c, c]
        v = v.reshape(nz, crop, ny, crop, nx, crop).transpose(0, 2, 4, 1, 3, 5)
        return v.reshape(-1, crop, crop, crop)

    return torch.from_numpy(cut(x).copy()).float()[:, None], torch.from_numpy(cut(y).copy()).long()


def random_crops(image: np.ndarray, labels: np.ndarray, crop: int, count: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` crops at seeded positions of the volume (padded to the crop where smaller): images
    [count, 1, c, c, c] and labels [count, c, c, c].

    Even crops lie uniformly in the volume; odd crops are centred on a random voxel of each foreground class in
    turn (nnU-Net's foreground oversampling: uniform 64^3 crops of a torso miss small structures, e.g. a lung base).
    """
    x, y = pad_to(image, (crop,) * 3), pad_to(labels, (crop,) * 3)
    rng = np.random.default_rng(seed)
    classes = [c for c in np.unique(y) if c != 0]
    starts = []
    for k in range(count):
        if k % 2 and classes:
            voxels = np.argwhere(y == classes[(k // 2) % len(classes)])  # [M, 3]
            centre = voxels[rng.integers(len(voxels))]
            starts.append([int(min(max(c - crop // 2, 0), n - crop)) for c, n in zip(centre, x.shape)])
        else:
            starts.append([int(rng.integers(0, n - crop + 1)) for n in x.shape])
    box = [tuple(slice(s, s + crop) for s in st) for st in starts]
    return (torch.from_numpy(np.stack([x[b] for b in box])).float()[:, None],
            torch.from_numpy(np.stack([y[b] for b in box])).long())


def slab_blocks(n: int, slab: int, gap: int, phase: int = 0) -> list[int | None]:
    """Slab index of each of `n` planes (None: a gap plane, dropped): slabs of `slab` planes with `gap` planes
    between them, the grid shifted by `phase` planes (plane i sits at position i + phase, so the first slab is
    `phase` planes short).

    Example:
        >>> slab_blocks(7, 2, 1, phase=1)
        [0, None, 1, 1, None, 2, 2]
    """
    return [(i + phase) // (slab + gap) if (i + phase) % (slab + gap) < slab else None for i in range(n)]


def _roles(block: Sequence[int | None], offset: int, period: int) -> list[str | None]:
    """Every `period`-th slab (those with index = offset mod period) validates, the others train; gaps: None."""
    return [None if b is None else "val" if b % period == offset else "train" for b in block]


def slab_roles(masks: Sequence[np.ndarray], slab: int, gap: int, period: int = 3) -> list[str | None]:
    """Train / val role of each plane of one subject (None: a gap plane, left out): the 2-D rule.

    Consecutive planes form slabs of `slab`, `gap` planes between slabs are dropped (no two neighbours in two
    splits), and every `period`-th slab validates. Of the `period` offsets, the one whose validation slabs show the
    most classes is taken (ties: the first), so that validation scores every class the subject has where it can.
    """
    block = slab_blocks(len(masks), slab, gap)
    present = [set(np.unique(m).tolist()) for m in masks]

    def covered(offset: int) -> int:
        return len(set().union(*[p for p, b in zip(present, block) if b is not None and b % period == offset]))

    offset = max(range(period), key=lambda o: (covered(o), -o))
    return _roles(block, offset, period)


def joint_slab_roles(present: dict[str, Sequence[set[int]]], slab: int, gap: int, period: int = 3,
                     min_slab: int = 1, min_planes: int = 1) -> dict[str, list[str | None]]:
    """Train / val role of each plane of several subjects, the slab grid chosen for all of them at once.

    Each subject's planes (`present[subject][i]`: the classes plane i shows) are cut by `slab_blocks` at some
    `phase` and every `period`-th slab validates (`slab_roles`' rule) at some offset; a slab cut short by the
    volume's ends must keep `min_slab` planes (or the whole volume, if shorter). A split shows a class when at
    least `min_planes` of its planes do. Over every combination of the subjects' phases and offsets, the one
    taken maximises, in this order: the classes both training and validation show (validation can select on
    them), the classes training shows, those validation shows, the training planes; ties: the first (smallest
    phases and offsets). Volumes need this where slices do not: a slab as thick as a 3-D crop holds a whole
    organ, so one subject's best offset alone can leave training without it.
    """
    options: dict[str, list[tuple[list[str | None], np.ndarray, np.ndarray]]] = {}
    classes = sorted(set().union(*[p for planes in present.values() for p in planes]))
    for subject, planes in present.items():
        n, seen, opts = len(planes), set(), []
        shows = np.array([[c in p for c in classes] for p in planes], dtype=np.int64).reshape(n, len(classes))
        for phase in range(slab + gap):
            block = slab_blocks(n, slab, gap, phase)
            sizes = [block.count(b) for b in set(block) - {None}]
            if min(sizes) < min(min_slab, n):
                continue
            for offset in range(period):
                roles = _roles(block, offset, period)
                if tuple(roles) not in seen:
                    seen.add(tuple(roles))
                    role = np.array(roles, dtype=object)
                    opts.append((roles, shows[role == "train"].sum(0), shows[role == "val"].sum(0)))  # planes/class
        if not opts:
            raise ValueError(f"{subject}: no slab grid of {slab} + {gap} planes keeps every slab >= {min_slab}")
        options[subject] = opts

    def rank(combo: tuple) -> tuple[int, int, int, int]:
        train = sum(c[1] for c in combo) >= min_planes  # [classes]: training shows the class
        val = sum(c[2] for c in combo) >= min_planes
        return int((train & val).sum()), int(train.sum()), int(val.sum()), sum(c[0].count("train") for c in combo)

    best = max(itertools.product(*options.values()), key=rank)  # the first maximum: smallest phases, offsets
    return {subject: c[0] for subject, c in zip(options, best)}
