"""Volume tasks' samples: seeded training crops and a deterministic tiling of whole volumes (3-D tasks).

A 3-D task trains on fixed cubes of `crop` voxels cut from its training volumes at seeded positions (the task's
seed, not a cell's: every row trains on the same crops; half of them centred on foreground) and is scored on
every voxel of its validation and test volumes once: each volume is padded evenly with air (image 0, background
label) to a multiple of the crop along every axis and cut into non-overlapping tiles, so the Dice over the tiles
is the Dice over the padded volume. `read_pair` reads an image (NIfTI file or DICOM series folder) and its label
map onto one LPS grid, optionally at an isotropic spacing.
"""

from __future__ import annotations

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
