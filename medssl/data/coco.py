"""COCO-style detection data for mammography (MedMask seed layout), augmentations and collate.

Layout (seed)::

    DATA_ROOT/<dataset>/annotations/instances_{train,val}.json   (rsna-bsd1k: instances_full.json)
    DATA_ROOT/<dataset>/images/{train,val,test}/

More datasets need no code: :func:`register_dataset` or a YAML file read by :func:`load_registry`::

    datasets:
      mydata:
        train: {ann: annotations/train.json, images: images/train}
        target: {images: unlabelled/}        # no ann: an unlabelled folder

Each sample is ``(image, target)``: ``image`` a float tensor ``[C, H, W]`` normalised with
``(x - mean) / std`` from intensities in [0, 1] (or a tuple ``(weak, strong)`` of two such tensors with
the SAME geometry for :func:`make_transforms` ``("weak_strong")``); ``target`` a dict of tensors:
``boxes`` [M, 4] cxcywh normalised by the transformed size, ``labels`` [M] int64 contiguous 0-based
indices into ``dataset.categories`` (sorted by COCO category id), ``image_id`` int64 (the COCO id),
``orig_size`` and ``size`` [2] as (h, w), ``hflip`` (bool: the view is mirrored, so that per-image
side data such as expert token grids can be mirrored too). :func:`collate_detection` pads to a batch with a padding
mask (True on padding, the DETR convention). For evaluation, ``dataset.gt_boxes_xyxy(i)`` gives the
original-pixel boxes and ``dataset.coco`` the ground-truth dict (for ``medssl.metrics.detection``).

Example::

    ds = build_dataset("demo", "train", "demo_data/mammo", make_transforms("weak", max_size=384))
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_detection)
    images, mask, targets = next(iter(loader))   # [B, C, H, W], [B, H, W], list of dicts
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
DEMO_HINT = "python recipes/medmask_detect.py --dataset demo"


@dataclass(frozen=True)
class SplitSpec:
    """Where one split lives, relative to ``DATA_ROOT/<dataset>``; ``ann=None`` means unlabelled folder."""

    images: str
    ann: str | None = None


def _seed_splits(train_ann: str) -> dict[str, SplitSpec]:
    return {
        "train": SplitSpec("images/train", f"annotations/{train_ann}"),
        "val": SplitSpec("images/val", "annotations/instances_val.json"),
        "test": SplitSpec("images/test", "annotations/instances_test.json"),
    }


_REGISTRY: dict[str, dict[str, SplitSpec]] = {
    "ddsm": _seed_splits("instances_train.json"),
    "inbreast": _seed_splits("instances_train.json"),
    "rsna-bsd1k": _seed_splits("instances_full.json"),
    "demo": {**_seed_splits("instances_train.json"),
             "target": SplitSpec("images/target", "annotations/instances_target.json"),
             # the target pool's boxes, known because the demo is generated: the oracle's training set and
             # the pseudo-label diagnostic (eval.pseudo_truth), never seen by the adaptation stages
             "target_truth": SplitSpec("images/target", "annotations/instances_target_truth.json"),
             # labelled target-domain images for tuning the generator's knobs (never the test split)
             "calib": SplitSpec("images/calib", "annotations/instances_calib.json")},
}


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset split is not on disk; the message says where, the layout, and the demo."""


def register_dataset(name: str, splits: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Register a dataset: ``splits`` maps split name -> ``{"images": dir, "ann": json or None}``.

    Paths are relative to ``DATA_ROOT/<name>`` (absolute paths are kept as they are).
    """
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True to replace it)")
    parsed = {}
    for split, spec in splits.items():
        if isinstance(spec, SplitSpec):
            parsed[split] = spec
        elif isinstance(spec, Mapping) and "images" in spec:
            ann = spec.get("ann")
            parsed[split] = SplitSpec(str(spec["images"]), None if ann is None else str(ann))
        else:
            raise ValueError(f"dataset {name!r} split {split!r}: expected {{images: DIR, ann: JSON}}, "
                             f"got {spec!r}")
    _REGISTRY[name] = parsed


def load_registry(path: str | Path) -> list[str]:
    """Register every dataset of a YAML file (``datasets: {name: {split: {images, ann}}}``); returns names."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset registry file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    datasets = data.get("datasets", data)
    if not isinstance(datasets, Mapping):
        raise ValueError(f"{path}: expected a mapping 'datasets: {{name: {{split: {{images, ann}}}}}}'")
    for name, splits in datasets.items():
        register_dataset(str(name), splits, overwrite=True)
    return [str(n) for n in datasets]


def registered_datasets() -> dict[str, dict[str, SplitSpec]]:
    """A copy of the registry: dataset name -> split name -> :class:`SplitSpec`."""
    return {k: dict(v) for k, v in _REGISTRY.items()}


def dataset_paths(name: str, split: str, data_root: str | Path) -> tuple[Path | None, Path]:
    """Resolve ``(annotation file or None, image dir)`` of a registered split, checking they exist.

    Raises:
        DatasetNotFoundError: with one message: where it looked, the layout required, and the demo.
        ValueError: for an unknown dataset or split name.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(_REGISTRY)} "
                         f"(add one with register_dataset or a registry YAML)")
    if split not in _REGISTRY[name]:
        raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(_REGISTRY[name])}")
    base = Path(data_root) / name
    spec = _REGISTRY[name][split]
    img_dir = base / spec.images
    ann = None if spec.ann is None else base / spec.ann
    missing = [p for p in (ann, img_dir) if p is not None and not p.exists()]
    if missing:
        layout = "\n".join(f"  {base / s.ann if s.ann else '(no annotations)'}  +  {base / s.images}/"
                           f"{'' if k in ('train', 'val') else '   (optional)'}"
                           for k, s in _REGISTRY[name].items())
        raise DatasetNotFoundError(
            f"dataset {name!r} split {split!r} not found: missing {', '.join(str(p) for p in missing)}.\n"
            f"Expected layout under DATA_ROOT={data_root} (COCO json, boxes xywh in pixels):\n{layout}\n"
            f"Point --data-root at the folder holding {name}/, register another layout in a registry "
            f"YAML, or run the synthetic demo instead:\n  {DEMO_HINT}"
        )
    return ann, img_dir


# ----------------------------------------------------------------------------------------- images
def read_image(path: str | Path) -> np.ndarray:
    """Read a greyscale image as float32 ``[H, W]`` in [0, 1].

    PNG / JPEG / TIFF (8 or 16 bit; RGB becomes grey) are read here with PIL. DICOM goes through
    ``medssl.data.imaging`` (modality LUT, VOI window, MONOCHROME1) - the one seam to the shared reader.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom(path)
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA", "P", "LA"):
                im = im.convert("L")
            a = np.asarray(im)
    except OSError as e:
        raise ValueError(f"unreadable image {path}: {e}") from e
    if a.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D greyscale image, got shape {a.shape}")
    if a.dtype.kind == "u" and a.dtype.itemsize == 1:
        return a.astype(np.float32) / 255.0
    if a.dtype.kind in "ui" and a.dtype.itemsize in (2, 4):  # 16-bit PNG/TIFF: I;16, I;16B, or I (int32)
        return np.clip(a.astype(np.float32) / 65535.0, 0.0, 1.0)
    if a.dtype == bool:
        return a.astype(np.float32)
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _read_dicom(path: Path) -> np.ndarray:
    """DICOM mammogram -> [H, W] float32 in [0, 1] via the shared reader ``medssl.data.imaging``.

    Modality LUT, VOI window (else percentile clip) and MONOCHROME1 inversion happen there; a
    multi-frame file gives its first frame.
    """
    try:
        from medssl.data import imaging
    except ImportError as e:
        raise ImportError(f"reading DICOM {path} needs pydicom (pip install 'medssl[dicom]')") from e
    a, _ = imaging.normalise(imaging.read_image(path))
    if a.ndim == 3:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D DICOM image, got shape {a.shape}")
    return a.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------- datasets
class CocoDetection(Dataset):
    """A COCO detection json + image folder; see the module docstring for the sample format.

    Args:
        ann_file: COCO json (``images``, ``annotations`` (may be absent: unlabelled), ``categories``).
        img_dir: folder holding ``file_name`` of each image.
        transforms: ``f(image [1, H, W] in [0, 1], target with xyxy pixel boxes) -> (image, target)``,
            e.g. :func:`make_transforms`; ``None`` uses ``make_transforms("none")``.
    """

    def __init__(self, ann_file: str | Path, img_dir: str | Path, transforms: Callable | None = None) -> None:
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.img_dir}")
        try:
            self.coco: dict[str, Any] = json.loads(self.ann_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.ann_file} is not valid JSON: {e}") from e
        if "images" not in self.coco:
            raise ValueError(f"{self.ann_file}: no 'images' list (not a COCO detection file)")
        self.coco.setdefault("annotations", [])
        self.categories = sorted(self.coco.get("categories", []), key=lambda c: c["id"])
        self.cat_to_label = {c["id"]: i for i, c in enumerate(self.categories)}
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        self._anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for a in self.coco["annotations"]:
            if a.get("iscrowd", 0):
                continue
            if a["image_id"] not in self._anns:
                raise ValueError(f"{self.ann_file}: annotation {a.get('id')} refers to unknown image "
                                 f"{a['image_id']}")
            if a["category_id"] not in self.cat_to_label:
                raise ValueError(f"{self.ann_file}: annotation {a.get('id')} has unknown category "
                                 f"{a['category_id']}")
            self._anns[a["image_id"]].append(a)
        self.transforms = transforms or make_transforms("none")

    def __len__(self) -> int:
        return len(self.images)

    def file_of(self, i: int) -> Path:
        """Path of the i-th image (its stem names the expert embedding ``<stem>_embedding.npy``)."""
        return self.img_dir / self.images[i]["file_name"]

    def subset(self, indices: Sequence[int]) -> CocoDetection:
        """The same dataset restricted to images ``indices`` (e.g. a labelled fraction), COCO dict included."""
        idx = sorted({int(i) for i in indices})
        if not idx or idx[0] < 0 or idx[-1] >= len(self.images):
            raise ValueError(f"{self.ann_file}: subset indices must be within 0..{len(self.images) - 1}, "
                             f"got {len(idx)} indices")
        sub = copy.copy(self)
        sub.images = [self.images[i] for i in idx]
        ids = {im["id"] for im in sub.images}
        sub._anns = {k: v for k, v in self._anns.items() if k in ids}
        sub.coco = {**self.coco, "images": sub.images,
                    "annotations": [a for a in self.coco["annotations"] if a["image_id"] in ids]}
        return sub

    def gt_boxes_xyxy(self, i: int) -> np.ndarray:
        """Ground-truth boxes of the i-th image, ``(M, 4)`` xyxy in original pixels (for FROC)."""
        b = np.array([a["bbox"] for a in self._anns[self.images[i]["id"]]], dtype=np.float64).reshape(-1, 4)
        b[:, 2:] += b[:, :2]  # xywh -> xyxy
        return b

    def __getitem__(self, i: int) -> tuple[Any, dict[str, torch.Tensor]]:
        info = self.images[i]
        img = torch.from_numpy(read_image(self.file_of(i)))[None]  # [1, H, W]
        h, w = img.shape[-2:]
        if "height" in info and "width" in info and (info["height"], info["width"]) != (h, w):
            raise ValueError(f"{self.file_of(i)}: size {h}x{w} differs from the COCO entry "
                             f"{info['height']}x{info['width']} in {self.ann_file}")
        anns = self._anns[info["id"]]
        boxes = torch.as_tensor(self.gt_boxes_xyxy(i), dtype=torch.float32).reshape(-1, 4)  # [M, 4]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {"boxes": boxes[keep], "labels": labels[keep], "image_id": torch.tensor(info["id"]),
                  "orig_size": torch.tensor([h, w])}
        return self.transforms(img, target)


class ConcatDetection(Dataset):
    """Several detection datasets read as one (e.g. source and target labels for an oracle), in order."""

    def __init__(self, parts: Sequence[Dataset]) -> None:
        if not parts:
            raise ValueError("ConcatDetection needs at least one dataset")
        self.parts = list(parts)
        self._where = [(k, i) for k, ds in enumerate(self.parts) for i in range(len(ds))]
        self.images = [im for ds in self.parts for im in ds.images]

    def __len__(self) -> int:
        return len(self._where)

    def file_of(self, i: int) -> Path:
        """Path of the i-th image."""
        k, j = self._where[i]
        return self.parts[k].file_of(j)

    def gt_boxes_xyxy(self, i: int) -> np.ndarray:
        """Ground-truth boxes of the i-th image, ``(M, 4)`` xyxy in original pixels."""
        k, j = self._where[i]
        return self.parts[k].gt_boxes_xyxy(j)

    def __getitem__(self, i: int) -> tuple[Any, dict[str, torch.Tensor]]:
        k, j = self._where[i]
        return self.parts[k][j]


class UnlabelledImages(Dataset):
    """Target-domain images without labels: every image file under a folder (sorted, recursive).

    Samples have the same format as :class:`CocoDetection` with empty boxes; ``image_id`` is the index.
    (A COCO file without annotations is read by :class:`CocoDetection` and gives the same.)
    """

    def __init__(self, folder: str | Path, transforms: Callable | None = None) -> None:
        self.img_dir = Path(folder)
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"unlabelled image folder not found: {self.img_dir}")
        self.files = sorted(p for p in self.img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {self.img_dir}")
        self.categories: list[dict] = []
        self.transforms = transforms or make_transforms("none")

    def __len__(self) -> int:
        return len(self.files)

    def file_of(self, i: int) -> Path:
        """Path of the i-th image."""
        return self.files[i]

    def gt_boxes_xyxy(self, i: int) -> np.ndarray:
        """No labels: an empty ``(0, 4)`` array."""
        return np.zeros((0, 4))

    def __getitem__(self, i: int) -> tuple[Any, dict[str, torch.Tensor]]:
        img = torch.from_numpy(read_image(self.files[i]))[None]  # [1, H, W]
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "image_id": torch.tensor(i), "orig_size": torch.tensor(list(img.shape[-2:]))}
        return self.transforms(img, target)


def build_dataset(name: str, split: str, data_root: str | Path,
                  transforms: Callable | None = None) -> Dataset:
    """The registered split ``name``/``split`` under ``data_root``: COCO dataset or unlabelled folder."""
    ann, img_dir = dataset_paths(name, split, data_root)
    if ann is None:
        return UnlabelledImages(img_dir, transforms)
    return CocoDetection(ann, img_dir, transforms)


# ----------------------------------------------------------------------------------- transforms
def _hflip(img: torch.Tensor, t: dict) -> tuple[torch.Tensor, dict]:
    w = img.shape[-1]
    b = t["boxes"].clone()  # [M, 4] xyxy
    b[:, [0, 2]] = w - t["boxes"][:, [2, 0]]
    return img.flip(-1), {**t, "boxes": b}


def _resize(img: torch.Tensor, t: dict, short: int | None, max_size: int) -> tuple[torch.Tensor, dict]:
    """Shorter side to ``short`` (None: keep, only shrink) with the longer side at most ``max_size``."""
    h, w = img.shape[-2:]
    scale = min(1.0 if short is None else short / min(h, w), max_size / max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return img, t
    out = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    b = t["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])  # [M, 4]
    return out.clamp(0, 1), {**t, "boxes": b}


def _photometric(img: torch.Tensor, brightness: float, contrast: float, gamma: float, blur_p: float,
                 erase_p: float) -> torch.Tensor:
    """Strong view: brightness / contrast / gamma jitter, Gaussian blur, random erasing (boxes kept)."""
    from torchvision.transforms import functional as TF

    u = torch.rand(3) * 2 - 1
    img = img.clamp(0, 1) ** (1 + gamma * u[2])
    mean = img.mean()
    img = ((img - mean) * (1 + contrast * u[1]) + mean + brightness * u[0]).clamp(0, 1)
    if torch.rand(()) < blur_p:
        sigma = float(0.1 + 1.9 * torch.rand(()))
        img = TF.gaussian_blur(img, kernel_size=2 * math.ceil(2 * sigma) + 1, sigma=sigma)
    h, w = img.shape[-2:]
    for _ in range(3):  # up to three erased rectangles, as in MRT's strong view
        if torch.rand(()) < erase_p:
            eh, ew = (max(1, int(h * float(0.05 + 0.2 * torch.rand(())))),
                      max(1, int(w * float(0.05 + 0.2 * torch.rand(())))))
            y, x = int(torch.randint(0, h - eh + 1, ())), int(torch.randint(0, w - ew + 1, ()))
            img = img.clone()
            img[..., y:y + eh, x:x + ew] = torch.rand(())
    return img


class DetectionTransform:
    """Geometric + photometric augmentation for detection samples (see :func:`make_transforms`)."""

    def __init__(self, kind: str, *, sizes: Sequence[int] | None, max_size: int, flip_p: float, in_chans: int,
                 mean: Sequence[float], std: Sequence[float], brightness: float = 0.25,
                 contrast: float = 0.25, gamma: float = 0.3, blur_p: float = 0.5,
                 erase_p: float = 0.5) -> None:
        if kind not in ("none", "weak", "strong", "weak_strong"):
            raise ValueError(f"transform kind must be none/weak/strong/weak_strong, got {kind!r}")
        if (sizes is not None and (not sizes or min(sizes) <= 0)) or max_size <= 0:
            raise ValueError(f"sizes and max_size must be positive, got {sizes}, {max_size}")
        if len(mean) not in (1, in_chans) or len(std) not in (1, in_chans):
            raise ValueError(f"mean/std need 1 or in_chans={in_chans} values, got {mean}, {std}")
        self.kind, self.max_size, self.flip_p = kind, max_size, flip_p
        self.sizes = None if sizes is None else list(sizes)
        self.in_chans = in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.jitter = (brightness, contrast, gamma, blur_p, erase_p)

    def _finish(self, img: torch.Tensor) -> torch.Tensor:
        return (img.expand(self.in_chans, -1, -1) - self.mean) / self.std  # [C, H, W]

    def __call__(self, img: torch.Tensor, target: dict) -> tuple[Any, dict]:
        """``img`` [1, H, W] in [0, 1], target boxes xyxy pixels -> normalised image(s), cxcywh target."""
        flipped = self.kind != "none" and bool(torch.rand(()) < self.flip_p)
        if flipped:
            img, target = _hflip(img, target)
        short = None
        if self.sizes is not None:
            short = self.sizes[int(torch.randint(len(self.sizes), ()))] if self.kind != "none" else self.sizes[-1]
        img, target = _resize(img, target, short, self.max_size)
        h, w = img.shape[-2:]
        b = target["boxes"]  # [M, 4] xyxy pixels
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                              (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], dim=-1).reshape(-1, 4)
        target = {**target, "boxes": cxcywh, "size": torch.tensor([h, w]), "hflip": torch.tensor(flipped)}
        if self.kind == "strong":
            return self._finish(_photometric(img, *self.jitter)), target
        if self.kind == "weak_strong":
            return (self._finish(img), self._finish(_photometric(img, *self.jitter))), target
        return self._finish(img), target


def make_transforms(kind: str = "weak", *, max_size: int = 1333, sizes: Sequence[int] | int | None = None,
                    flip_p: float = 0.5, in_chans: int = 1, mean: Sequence[float] = (0.5,),
                    std: Sequence[float] = (0.25,), **jitter: float) -> DetectionTransform:
    """Detection augmentations.

    Args:
        kind: ``"none"`` (evaluation: resize only), ``"weak"`` (flip + random resize), ``"strong"``
            (weak + brightness/contrast/gamma jitter, Gaussian blur, random erasing) or
            ``"weak_strong"`` (one geometry, two views ``(weak, strong)`` for teacher-student training).
        max_size: longest side after resizing.
        sizes: candidate shorter sides (one chosen at random; ``"none"`` uses the last), up- or
            down-scaling; default None: the size is kept, images larger than ``max_size`` shrink.
        flip_p: horizontal flip probability.
        in_chans: the grey image is repeated to this many channels (3 for ImageNet ResNets).
        mean, std: normalisation applied after repeating.
        **jitter: ``brightness``, ``contrast``, ``gamma``, ``blur_p``, ``erase_p`` for strong views.
    """
    sizes = [sizes] if isinstance(sizes, int) else (None if sizes is None else list(sizes))
    return DetectionTransform(kind, sizes=sizes, max_size=max_size, flip_p=flip_p, in_chans=in_chans,
                              mean=mean, std=std, **jitter)


# -------------------------------------------------------------------------------------- collate
def collate_detection(batch: Sequence[tuple[Any, dict]], pad_to_multiple: int = 1
                      ) -> tuple[Any, torch.Tensor, list[dict]]:
    """Pad images to the largest size of the batch (bottom/right, zeros).

    Returns:
        ``(images [B, C, H, W] (or a tuple of those for two-view samples), mask [B, H, W] bool True on
        padding, targets)``. ``H, W`` are rounded up to ``pad_to_multiple``.
    """
    if not batch:
        raise ValueError("collate_detection got an empty batch")
    views = [s[0] if isinstance(s[0], tuple) else (s[0],) for s in batch]
    shapes = torch.tensor([v[0].shape for v in views])  # [B, 3]
    c = int(shapes[:, 0].max())
    hh, ww = (int(math.ceil(int(shapes[:, k].max()) / pad_to_multiple) * pad_to_multiple) for k in (1, 2))
    out = [torch.zeros(len(batch), c, hh, ww, dtype=views[0][0].dtype) for _ in views[0]]
    mask = torch.ones(len(batch), hh, ww, dtype=torch.bool)
    for i, v in enumerate(views):
        h, w = v[0].shape[-2:]
        for j, im in enumerate(v):
            out[j][i, :, :h, :w] = im
        mask[i, :h, :w] = False
    images = tuple(out) if isinstance(batch[0][0], tuple) else out[0]
    return images, mask, [s[1] for s in batch]
