"""The MedMask seed layout of a COCO detection dataset, and its check.

Seed layout: ``annotations/instances_{train,val}.json`` (or ``instances_full.json`` for the training
set, as RSNA-BSD1K) and ``images/{train,val,test}/``; ``instances_<split>.json`` describes the images of
``images/<split>/`` (``full`` -> ``train``). :func:`validate` reports every problem it finds.

Used by the converters (``coco_tools from-csv``, :mod:`data_tools.mammo_releases`) and by the
``coco_tools validate`` command; imports neither.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Report", "table_number", "validate", "validate_coco"]

REQUIRED_IMAGE_DIRS = ("train", "val")
MAX_LISTED = 20  # problems of one kind printed in full; the rest are counted


@dataclass
class Report:
    """Result of :func:`validate`: ``errors`` and ``warnings`` (one line each) and per-file ``summary``."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding pixels; raises ValueError if unreadable."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        from medssl.data.imaging import UnreadableImage, read_dicom_header

        try:
            ds = read_dicom_header(path)
        except UnreadableImage as e:
            raise ValueError(f"unreadable DICOM ({e.reason})") from e
        if "Rows" not in ds or "Columns" not in ds:
            raise ValueError("DICOM without image size (no pixel data)")
        return int(ds.Rows), int(ds.Columns)
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as e:  # PIL raises many types for broken files
        raise ValueError(f"unreadable image ({type(e).__name__}: {str(e)[:80]})") from e


def _split_of(ann_file: Path) -> str:
    """The image folder of an annotation file: ``instances_<split>.json`` -> ``<split>``; the seed's
    ``full`` file and a ``<split>_truth`` file (labels of an unlabelled pool) describe other folders' images."""
    split = ann_file.stem.removeprefix("instances_").removesuffix("_truth")
    return "train" if split == "full" else split


def _dups(values: list[Any]) -> list[Any]:
    return sorted((v for v, n in Counter(values).items() if n > 1), key=str)


def validate_coco(coco: dict[str, Any], img_dir: Path, name: str, report: Report, check_files: bool = True) -> None:
    """Check one COCO dict against its image folder, appending problems to ``report``."""
    errs: list[str] = []
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            report.errors.append(f"{name}: no '{key}' list")
            return
    labelled = "annotations" in coco
    anns = coco.get("annotations", [])
    if not isinstance(anns, list):
        report.errors.append(f"{name}: 'annotations' is not a list")
        return
    img_ids = [im.get("id") for im in coco["images"]]
    cat_ids = {c.get("id") for c in coco["categories"]}
    for kind, ids in (("image", img_ids), ("annotation", [a.get("id") for a in anns]),
                      ("category", [c.get("id") for c in coco["categories"]]),
                      ("file_name", [im.get("file_name") for im in coco["images"]])):
        for d in _dups(ids):
            errs.append(f"{name}: duplicate {kind} id {d!r}" if kind != "file_name"
                        else f"{name}: file_name {d!r} listed twice")
    sizes: dict[Any, tuple[float, float]] = {}
    for im in coco["images"]:
        fn, h, w = im.get("file_name"), im.get("height"), im.get("width")
        if not fn or not isinstance(h, int) or not isinstance(w, int) or h <= 0 or w <= 0:
            errs.append(f"{name}: image {im.get('id')!r} needs file_name and positive integer height/width")
            continue
        sizes[im["id"]] = (h, w)
        if not check_files:
            continue
        path = img_dir / fn
        if not path.is_file():
            errs.append(f"{name}: image {im['id']} file missing: {path}")
            continue
        try:
            fh, fw = _image_size(path)
        except ValueError as e:
            errs.append(f"{name}: image {im['id']} {path}: {e}")
            continue
        if (fh, fw) != (h, w):
            errs.append(f"{name}: image {im['id']} {path}: size {fh}x{fw} on disk, {h}x{w} in the json")
    per_image = Counter()
    for a in anns:
        aid, iid, box = a.get("id"), a.get("image_id"), a.get("bbox")
        if iid not in sizes:
            if iid not in img_ids:
                errs.append(f"{name}: annotation {aid!r} refers to unknown image {iid!r}")
            continue
        if a.get("category_id") not in cat_ids:
            errs.append(f"{name}: annotation {aid!r} has unknown category {a.get('category_id')!r}")
        if (not isinstance(box, list) or len(box) != 4 or
                not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            errs.append(f"{name}: annotation {aid!r} bbox must be 4 finite numbers [x, y, w, h], got {box!r}")
            continue
        x, y, bw, bh = box
        h, w = sizes[iid]
        if bw <= 0 or bh <= 0:
            errs.append(f"{name}: annotation {aid!r} has zero or negative area (w={bw}, h={bh})")
        elif x < 0 or y < 0 or x + bw > w + 1e-6 or y + bh > h + 1e-6:
            errs.append(f"{name}: annotation {aid!r} box [{x}, {y}, {bw}, {bh}] outside image {iid} ({w}x{h})")
        per_image[iid] += 1
    for e in errs[:MAX_LISTED]:
        report.errors.append(e)
    if len(errs) > MAX_LISTED:
        report.errors.append(f"{name}: ... and {len(errs) - MAX_LISTED} more errors")
    report.summary[name] = {
        "images": len(coco["images"]), "annotations": len(anns), "labelled": labelled,
        "images_with_lesions": len(per_image), "normal_images": len(coco["images"]) - len(per_image),
        "categories": {c.get("name", str(c.get("id"))): sum(a.get("category_id") == c.get("id") for a in anns)
                       for c in coco["categories"]},
        "errors": len(errs)}


def validate(dataset_dir: str | Path, *, check_files: bool = True) -> Report:
    """Check the seed layout of ``dataset_dir`` and every ``annotations/instances_*.json`` in it."""
    root = Path(dataset_dir)
    report = Report()
    if not root.is_dir():
        report.errors.append(f"{root}: dataset folder not found (expected DATA_ROOT/DATASET with "
                             f"annotations/ and images/)")
        return report
    ann_dir = root / "annotations"
    files = sorted(ann_dir.glob("instances_*.json")) if ann_dir.is_dir() else []
    if not files:
        report.errors.append(f"{ann_dir}: no instances_*.json (need instances_train.json or "
                             f"instances_full.json, and instances_val.json)")
    names = {f.name for f in files}
    if files and not names & {"instances_train.json", "instances_full.json"}:
        report.errors.append(f"{ann_dir}: no instances_train.json (or instances_full.json)")
    if files and "instances_val.json" not in names:
        report.errors.append(f"{ann_dir}: no instances_val.json")
    for d in REQUIRED_IMAGE_DIRS:
        if not (root / "images" / d).is_dir():
            report.errors.append(f"{root / 'images' / d}: image folder missing")
    if not (root / "images" / "test").is_dir():
        report.warnings.append(f"{root / 'images' / 'test'}: no test image folder")
    for f in files:
        try:
            coco = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            report.errors.append(f"{f}: not valid JSON ({e})")
            continue
        if not isinstance(coco, dict):
            report.errors.append(f"{f}: not a COCO object")
            continue
        img_dir = root / "images" / _split_of(f)
        if not img_dir.is_dir():
            report.errors.append(f"{f}: its image folder {img_dir} is missing")
            continue
        validate_coco(coco, img_dir, f.name, report, check_files)
    return report


def table_number(row: dict[str, str], col: str, line: int, path: Path) -> float | None:
    """The number in column `col` of a table row (line `line` of `path`); None for an empty / NaN cell.

    Raises ValueError naming the file, line and column for a cell that is not a finite number.
    """
    v = (row.get(col) or "").strip()
    if v == "" or v.lower() in ("nan", "none", "null"):
        return None
    try:
        x = float(v)
    except ValueError as e:
        raise ValueError(f"{path}:{line}: column {col!r} is not a number: {v!r}") from e
    if not math.isfinite(x):
        raise ValueError(f"{path}:{line}: column {col!r} is not finite: {v!r}")
    return x
