"""Check and build COCO detection datasets in the MedMask seed layout.

    python -m data_tools.coco_tools validate DATA_ROOT/DATASET
    python -m data_tools.coco_tools from-csv findings.csv --out DATA_ROOT/DATASET \\
        --image-col image_id --width-col width --height-col height \\
        --box-cols xmin,ymin,xmax,ymax --box-format xyxy --category-col label --split-col split
    python -m data_tools.coco_tools from-cbis-ddsm|from-inbreast|from-vindr SRC --out DATA_ROOT/DATASET

``from-<release>`` converts a public mammography download (DICOM + the release's annotations) with its
images: see :mod:`data_tools.mammo_releases`.

Seed layout: ``annotations/instances_{train,val}.json`` (or ``instances_full.json`` for the training
set, as RSNA-BSD1K) and ``images/{train,val,test}/``; ``instances_<split>.json`` describes the images of
``images/<split>/`` (``full`` -> ``train``). ``validate`` exits 1 when it finds errors.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------------------- from-csv
def _num(row: dict[str, str], col: str, line: int, path: Path) -> float | None:
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


def from_csv(csv_path: str | Path, out_dir: str | Path, *, image_col: str, width_col: str, height_col: str,
             box_cols: list[str], box_format: str = "xyxy", category_col: str | None = None,
             split_col: str | None = None, default_split: str = "train", file_col: str | None = None,
             ext: str = ".png", delimiter: str = ",") -> dict[str, dict[str, int]]:
    """Build ``out_dir/annotations/instances_<split>.json`` from a findings table.

    One row per finding; a row whose box columns are empty is an image without findings (a normal).
    Image ids may be any strings: COCO ids are assigned 1, 2, ... in order of appearance, and
    ``file_name`` is ``file_col`` or ``<image id><ext>``. Categories are numbered 1.. in sorted order of
    names (one ``lesion`` category without ``category_col``).

    Returns:
        ``{split: {"images", "annotations"}}`` counts.
    """
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
    if len(box_cols) != 4:
        raise ValueError(f"box_cols needs 4 column names, got {box_cols}")
    if not csv_path.is_file():
        raise FileNotFoundError(f"findings table not found: {csv_path}")
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        cols = reader.fieldnames or []
        needed = [image_col, width_col, height_col, *box_cols, *(c for c in (category_col, split_col, file_col) if c)]
        missing = [c for c in needed if c not in cols]
        if missing:
            raise ValueError(f"{csv_path}: columns {missing} not found; the table has {cols}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    images: dict[str, dict[str, Any]] = {}
    findings: list[tuple[str, list[float], str]] = []
    for line, row in enumerate(rows, start=2):
        key = (row[image_col] or "").strip()
        if not key:
            raise ValueError(f"{csv_path}:{line}: empty {image_col!r}")
        w, h = _num(row, width_col, line, csv_path), _num(row, height_col, line, csv_path)
        if w is None or h is None or w <= 0 or h <= 0 or w != int(w) or h != int(h):
            raise ValueError(f"{csv_path}:{line}: width/height must be positive integers, got {w}, {h}")
        split = (row[split_col].strip() if split_col else "") or default_split
        fname = (row[file_col].strip() if file_col else "") or f"{key}{ext}"
        info = {"file_name": fname, "width": int(w), "height": int(h), "split": split}
        if key in images and images[key] != info:
            raise ValueError(f"{csv_path}:{line}: image {key!r} disagrees with an earlier row: {info} vs {images[key]}")
        images.setdefault(key, info)
        vals = [_num(row, c, line, csv_path) for c in box_cols]
        if all(v is None for v in vals):
            continue  # a normal image
        if any(v is None for v in vals):
            raise ValueError(f"{csv_path}:{line}: some box columns {box_cols} are empty")
        a, b, c, d = vals
        box = [a, b, c - a, d - b] if box_format == "xyxy" else [a, b, c, d]
        if box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"{csv_path}:{line}: box {vals} ({box_format}) has zero or negative area")
        cat = (row[category_col].strip() if category_col else "") or "lesion"
        findings.append((key, box, cat))
    cat_names = sorted({c for _, _, c in findings}) or ["lesion"]
    cat_id = {n: i + 1 for i, n in enumerate(cat_names)}
    img_id = {k: i + 1 for i, k in enumerate(images)}
    per_split: dict[str, dict[str, list]] = defaultdict(lambda: {"images": [], "annotations": []})
    for k, info in images.items():
        per_split[info["split"]]["images"].append({"id": img_id[k], "file_name": info["file_name"],
                                                   "width": info["width"], "height": info["height"]})
    for n, (k, box, cat) in enumerate(findings, start=1):
        per_split[images[k]["split"]]["annotations"].append(
            {"id": n, "image_id": img_id[k], "category_id": cat_id[cat], "bbox": box,
             "area": box[2] * box[3], "iscrowd": 0})
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": cat_id[n], "name": n} for n in cat_names]
    counts = {}
    for split, d in sorted(per_split.items()):
        coco = {"info": {"description": f"converted from {csv_path.name}"}, "images": d["images"],
                "annotations": d["annotations"], "categories": cats}
        (out_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        counts[split] = {"images": len(d["images"]), "annotations": len(d["annotations"])}
    return counts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``validate`` / ``from-csv`` / ``from-<release>``)."""
    p = argparse.ArgumentParser(prog="python -m data_tools.coco_tools", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check the layout and COCO files of DATA_ROOT/DATASET")
    v.add_argument("dataset", help="DATA_ROOT/DATASET folder")
    v.add_argument("--no-files", action="store_true", help="skip opening image files")
    c = sub.add_parser("from-csv", help="build COCO files from a findings table")
    c.add_argument("csv")
    c.add_argument("--out", required=True, help="DATA_ROOT/DATASET folder to write annotations/ into")
    c.add_argument("--image-col", required=True)
    c.add_argument("--width-col", required=True)
    c.add_argument("--height-col", required=True)
    c.add_argument("--box-cols", required=True, help="4 comma-separated column names")
    c.add_argument("--box-format", choices=("xyxy", "xywh"), default="xyxy")
    c.add_argument("--category-col")
    c.add_argument("--split-col")
    c.add_argument("--split", default="train", help="split of rows without a split column / value")
    c.add_argument("--file-col", help="column with the image file name (default: <image id><ext>)")
    c.add_argument("--ext", default=".png")
    c.add_argument("--delimiter", default=",")
    from data_tools import mammo_releases

    for release in mammo_releases.RELEASES:
        r = sub.add_parser(f"from-{release}", help=f"convert a {release} download (DICOM) to this layout, "
                                                   f"images included (see data_tools/mammo_releases/)")
        mammo_releases.add_arguments(r, release)
    args = p.parse_args(argv)
    if args.cmd.removeprefix("from-") in mammo_releases.RELEASES:
        return mammo_releases.run(args.cmd.removeprefix("from-"), args)
    if args.cmd == "validate":
        report = validate(args.dataset, check_files=not args.no_files)
        for name, s in report.summary.items():
            if not s["labelled"]:
                print(f"{name}: {s['images']} unlabelled images, {s['errors']} errors")
                continue
            print(f"{name}: {s['images']} images ({s['images_with_lesions']} with findings, {s['normal_images']} "
                  f"normal), {s['annotations']} boxes, per category {s['categories']}, {s['errors']} errors")
        for w in report.warnings:
            print(f"warning: {w}")
        for e in report.errors:
            print(f"error: {e}")
        print(f"{'OK' if report.ok else 'FAILED'}: {len(report.errors)} errors, {len(report.warnings)} warnings")
        return 0 if report.ok else 1
    try:
        counts = from_csv(args.csv, args.out, image_col=args.image_col, width_col=args.width_col,
                          height_col=args.height_col, box_cols=[s.strip() for s in args.box_cols.split(",")],
                          box_format=args.box_format, category_col=args.category_col,
                          split_col=args.split_col, default_split=args.split, file_col=args.file_col,
                          ext=args.ext, delimiter=args.delimiter)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, n in counts.items():
        print(f"instances_{split}.json: {n['images']} images, {n['annotations']} boxes")
    print(f"now put the images into {Path(args.out) / 'images'}/<split>/ and run: "
          f"python -m data_tools.coco_tools validate {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
