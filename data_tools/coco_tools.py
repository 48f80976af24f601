"""Check and build COCO detection datasets in the MedMask seed layout.

    python -m data_tools.coco_tools validate DATA_ROOT/DATASET
    python -m data_tools.coco_tools from-csv findings.csv --out DATA_ROOT/DATASET \\
        --image-col image_id --width-col width --height-col height \\
        --box-cols xmin,ymin,xmax,ymax --box-format xyxy --category-col label --split-col split
    python -m data_tools.coco_tools from-cbis-ddsm|from-inbreast|from-vindr SRC --out DATA_ROOT/DATASET

``from-<release>`` converts a public mammography download (DICOM + the release's annotations) with its
images: see :mod:`data_tools.mammo_releases`.

The seed layout and its check live in :mod:`data_tools.coco_layout`; ``validate`` exits 1 when it finds
errors.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from data_tools.coco_layout import table_number, validate


# --------------------------------------------------------------------------------------- from-csv
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
        w, h = table_number(row, width_col, line, csv_path), table_number(row, height_col, line, csv_path)
        if w is None or h is None or w <= 0 or h <= 0 or w != int(w) or h != int(h):
            raise ValueError(f"{csv_path}:{line}: width/height must be positive integers, got {w}, {h}")
        split = (row[split_col].strip() if split_col else "") or default_split
        fname = (row[file_col].strip() if file_col else "") or f"{key}{ext}"
        info = {"file_name": fname, "width": int(w), "height": int(h), "split": split}
        if key in images and images[key] != info:
            raise ValueError(f"{csv_path}:{line}: image {key!r} disagrees with an earlier row: {info} vs {images[key]}")
        images.setdefault(key, info)
        vals = [table_number(row, c, line, csv_path) for c in box_cols]
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
