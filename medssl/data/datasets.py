"""Labelled data sets for transfer: classification from a folder tree or CSV, segmentation from pairs.

Images are read and intensity-normalised with `medssl.data.imaging` (the same code the shard builder
uses), volumes are cut into 2-D planes with its `iter_slices`, and everything is resized to a square
`img_size` (`resize_square`, padding keeps the whole field of view). Masks follow the image exactly:
each class is resized as a one-hot plane and the label is the argmax, so image and mask stay aligned.

Splits are made by group (patient, volume): every sample of a group lands in the same split, so
slices of one volume never appear on both sides.

Inputs:
- classification folder: `root/<class name>/**/<image>`; classes sorted by name.
- classification CSV: header `path,label[,patient]`; paths relative to the CSV; labels are names
  or integers (sorted names give the indices).
- segmentation CSV: header `image,mask[,patient]`; 2-D images (PNG/JPEG/DICOM) or NIfTI volumes
  (then all planes along `axis`, default 0 = axial in the reader's [S->I, A->P, R->L] order, with
  some foreground are used, and the volume is the group).
  Mask pixels are class indices; a mask holding only {0, 255} is read as {0, 1}.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl.data.imaging import (
    NIFTI_SUFFIXES,
    RASTER_SUFFIXES,
    iter_slices,
    normalise,
    read_image,
    resize2d,
    resize_square,
)

SPLITS = ("train", "val", "test")


@dataclass
class Record:
    """One labelled input before loading: an image path, a class index or mask path, a group id."""

    path: Path
    target: int | Path
    group: str


def _to_chans(img01: np.ndarray, in_chans: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img01, dtype=np.float32))[None]  # [1, S, S]
    return t.expand(in_chans, -1, -1).clone()  # [C, S, S]


def load_2d(path: Path, img_size: int) -> np.ndarray:
    """Read one image file as a normalised [img_size, img_size] float array in [0, 1].

    Volumes and multi-frame files give their middle plane / frame. CT uses a wide HU window.
    """
    from medssl.data.imaging import Window

    img = read_image(path)
    window = Window("wide", -1000.0, 1000.0) if img.modality == "CT" else None
    px, _ = normalise(img, window)
    if px.ndim == 3:
        px = px[px.shape[0] // 2]
    return resize_square(px, img_size, fit="pad")


def scan_folder(root: str | Path) -> tuple[list[Record], list[str]]:
    """Records of a class-per-folder tree; the group of a file is its path (no patient info)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root}: need at least 2 class sub-folders, found {classes}")
    records = []
    for idx, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                records.append(Record(f, idx, str(f.relative_to(root))))
    return records, classes


def read_csv(path: str | Path, columns: tuple[str, str]) -> list[dict[str, str]]:
    """Rows of a CSV that must have the two given columns (an optional `patient` column is kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CSV file")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; header is {list(rows[0])}")
    for i, r in enumerate(rows):
        for c in columns:
            if not r[c]:
                raise ValueError(f"{path}: row {i + 2} has an empty {c!r}")
    return rows


def resolve_path(base: Path, p: str) -> Path:
    """A path listed in a CSV, relative to the CSV's folder unless absolute; it must exist."""
    q = Path(p)
    q = q if q.is_absolute() else base / q
    if not q.exists():
        raise FileNotFoundError(f"{q}: listed in the CSV but missing")
    return q


def classification_records(source: str | Path) -> tuple[list[Record], list[str]]:
    """Records and class names from a folder tree or a `path,label[,patient]` CSV."""
    source = Path(source)
    if source.is_dir():
        return scan_folder(source)
    rows = read_csv(source, ("path", "label"))
    labels = [r["label"] for r in rows]
    if all(lab.lstrip("-").isdigit() for lab in labels):
        values = sorted({int(lab) for lab in labels})
        if values[0] < 0:
            raise ValueError(f"{source}: negative class index {values[0]}")
        classes = [str(i) for i in range(values[-1] + 1)]
        index = {str(i): i for i in values}
    else:
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
    recs = [Record(resolve_path(source.parent, r["path"]), index[r["label"]], r.get("patient") or r["path"])
            for r in rows]
    return recs, classes


def split_by_group(groups: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                   seed: int = 0) -> list[str]:
    """Assign each sample a split name so that a group never straddles splits.

    Groups are shuffled with `seed`; each split with a non-zero fraction first gets one group, then
    every remaining group goes to the split furthest below its share of the samples.

    Returns:
        list of "train" / "val" / "test", one per sample.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers, got {fractions}")
    active = [k for k in range(3) if fractions[k] > 0]
    uniq = sorted(set(groups))
    if len(uniq) < len(active):
        raise ValueError(f"{len(uniq)} groups cannot fill {len(active)} splits")
    rng = np.random.default_rng(seed)
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    sizes = {g: 0 for g in uniq}
    for g in groups:
        sizes[g] += 1
    target = np.asarray(fractions, dtype=np.float64) / sum(fractions) * len(groups)
    count = np.zeros(3)
    assign: dict[str, str] = {}
    for i, g in enumerate(order):
        if i < len(active):
            k = active[i]
        else:
            k = max(active, key=lambda j: target[j] - count[j])
        assign[g] = SPLITS[k]
        count[k] += sizes[g]
    return [assign[g] for g in groups]


class ClassificationDataset(Dataset):
    """(image [in_chans, S, S] in [0, 1], class index) pairs, loaded once into memory.

    Args:
        records: from `classification_records`.
        img_size: output side S.
        in_chans: channels (grey replicated).
    """

    def __init__(self, records: Sequence[Record], img_size: int, in_chans: int = 1):
        if not records:
            raise ValueError("ClassificationDataset: no records")
        self.records = list(records)
        self.images = torch.stack([_to_chans(load_2d(r.path, img_size), in_chans) for r in self.records])
        self.labels = torch.tensor([int(r.target) for r in self.records])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def _read_mask(path: Path) -> np.ndarray:
    if str(path).lower().endswith(NIFTI_SUFFIXES):
        from medssl.data.imaging import read_nifti

        return read_nifti(path, modality="MR").pixels  # same reorientation as the image volume
    if str(path).lower().endswith(RASTER_SUFFIXES):
        from PIL import Image

        m = np.asarray(Image.open(path))
        return m[..., 0] if m.ndim == 3 else m
    raise ValueError(f"{path}: mask must be PNG/JPEG/TIFF or NIfTI")


def _labels(mask: np.ndarray, path: Path, num_classes: int | None) -> np.ndarray:
    m = np.rint(mask).astype(np.int64)
    if set(np.unique(m).tolist()) <= {0, 255}:
        m = (m == 255).astype(np.int64)
    if m.min() < 0 or (num_classes is not None and m.max() >= num_classes):
        raise ValueError(f"{path}: mask values must be class indices in [0, {num_classes}), "
                         f"found [{m.min()}, {m.max()}]")
    return m


def _resize_mask(mask: np.ndarray, shape: tuple[int, int] | None, size: int, num_classes: int) -> np.ndarray:
    planes = []
    for c in range(num_classes):
        p = (mask == c).astype(np.float32)
        if shape is not None and p.shape != shape:
            p = resize2d(p, *shape)
        planes.append(resize_square(p, size, fit="pad"))
    return np.stack(planes).argmax(axis=0)  # [S, S]


def slice_pair(image_path: Path, mask_path: Path, img_size: int, num_classes: int, axis: int = 0,
               min_foreground: float = 0.05) -> list[tuple[np.ndarray, np.ndarray]]:
    """2-D (image, mask) pairs of one image/mask file pair; volumes are sliced along `axis`."""
    img = read_image(image_path)
    mask = _labels(_read_mask(mask_path), mask_path, num_classes)
    from medssl.data.imaging import Window

    px, _ = normalise(img, Window("wide", -1000.0, 1000.0) if img.modality == "CT" else None)
    if img.is_volume and px.ndim == 3:
        vol_mask = mask
        if vol_mask.shape != px.shape:
            raise ValueError(f"{mask_path}: mask shape {mask.shape} does not match image {px.shape}")
        out = []
        for s in iter_slices(px, img.spacing, axis=axis, min_foreground=min_foreground):
            m = np.take(vol_mask, s.index, axis=axis)
            out.append((resize_square(s.pixels, img_size, fit="pad"),
                        _resize_mask(m, s.pixels.shape, img_size, num_classes)))
        return out
    if px.ndim == 3:
        px = px[px.shape[0] // 2]
    if mask.shape != px.shape:
        raise ValueError(f"{mask_path}: mask shape {mask.shape} does not match image {px.shape}")
    return [(resize_square(px, img_size, fit="pad"), _resize_mask(mask, None, img_size, num_classes))]


class SegmentationDataset(Dataset):
    """(image [C, S, S], mask [S, S] int64) pairs in memory, built from arrays or from files.

    Args:
        images: [N, S, S] float array in [0, 1].
        masks: [N, S, S] integer class maps.
        groups: group id per sample (volume / patient), used for splitting.
        in_chans: channels (grey replicated).
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, groups: Sequence[str], in_chans: int = 1):
        if len(images) != len(masks) or len(images) != len(groups) or len(images) == 0:
            raise ValueError(f"SegmentationDataset: {len(images)} images, {len(masks)} masks, {len(groups)} "
                             "groups must be equal and non-zero")
        self.images = torch.as_tensor(np.asarray(images, np.float32))[:, None].expand(-1, in_chans, -1, -1)
        self.masks = torch.as_tensor(np.asarray(masks, np.int64))
        self.groups = list(groups)

    @classmethod
    def from_csv(cls, csv_path: str | Path, img_size: int, num_classes: int, in_chans: int = 1,
                 axis: int = 0, min_foreground: float = 0.05) -> SegmentationDataset:
        """Load every pair listed in an `image,mask[,patient]` CSV (paths relative to it)."""
        csv_path = Path(csv_path)
        imgs, masks, groups = [], [], []
        for r in read_csv(csv_path, ("image", "mask")):
            ip, mp = resolve_path(csv_path.parent, r["image"]), resolve_path(csv_path.parent, r["mask"])
            for im, m in slice_pair(ip, mp, img_size, num_classes, axis, min_foreground):
                imgs.append(im)
                masks.append(m)
                groups.append(r.get("patient") or r["image"])
        return cls(np.stack(imgs), np.stack(masks), groups, in_chans)

    def subset(self, keep: Sequence[int]) -> SegmentationDataset:
        """A new dataset with the samples at `keep`."""
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        return SegmentationDataset(self.images[idx, 0].numpy(), self.masks[idx].numpy(),
                                   [self.groups[i] for i in idx.tolist()], self.images.shape[1])

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.masks[i]
