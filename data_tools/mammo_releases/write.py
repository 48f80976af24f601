"""One case to a 16-bit PNG and its manifest record; the COCO files from the manifest; resume helpers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.mammo_releases.cases import SPLITS, Case, Options, Skip
from data_tools.mammo_releases.cbis_ddsm import roi_boxes
from data_tools.shards_build.report import check_same_options, write_json
from medssl.data import imaging

OPTIONS_FILE = "convert_options.json"


def write_png16(path: Path, img01: np.ndarray) -> None:
    """16-bit PNG written to a temporary name, then moved into place."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(imaging.to_dtype(img01, "uint16")).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def fit_box(box: Sequence[float], h: int, w: int, min_box: float) -> tuple[float, float, float, float] | None:
    """Clip to the image and grow to at least `min_box` per side about its centre (point ROIs)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0 or x1 < 0 or y1 < 0 or x0 > w or y0 > h:
        return None
    side = min(min_box, w, h)
    if x1 - x0 < side:
        cx = (x0 + x1) / 2
        x0, x1 = cx - side / 2, cx + side / 2
    if y1 - y0 < side:
        cy = (y0 + y1) / 2
        y0, y1 = cy - side / 2, cy + side / 2
    x0, x1 = (x0, x1) if x0 >= 0 else (0.0, x1 - x0)  # shift rather than shrink at the border
    y0, y1 = (y0, y1) if y0 >= 0 else (0.0, y1 - y0)
    x0, x1 = (x0, x1) if x1 <= w else (x0 - (x1 - w), float(w))
    y0, y1 = (y0, y1) if y1 <= h else (y0 - (y1 - h), float(h))
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def convert_case(case: Case, split: str, out: Path, opts: Options) -> dict[str, Any]:
    """Write one case's PNG and return its manifest record (status converted); raises `Skip`."""
    if case.problem:
        raise Skip(case.problem)
    chosen = [f for f in case.findings if f.kind in opts.kinds]
    positive = [f for f in chosen if f.positive]
    if not positive and chosen and not opts.keep_negatives:
        raise Skip(f"no positive finding (labels {sorted({f.label for f in chosen})}) and --drop-negatives")
    if not chosen and not opts.include_normals:
        raise Skip(f"no {'/'.join(opts.kinds)} finding (normal for these kinds); --include-normals keeps it")
    if not case.image or not Path(case.image).is_file():
        raise Skip(f"DICOM not found: {case.image}")
    try:
        img = imaging.read_image(case.image)
        px, intensity = imaging.normalise(img)  # [H, W] or [N, H, W] in [0, 1]
    except imaging.UnreadableImage as e:
        raise Skip(e.reason) from e
    if px.ndim == 3:
        px = px[0]
    h, w = px.shape
    if case.size is not None and case.size != (h, w):
        raise Skip(f"annotations are for {case.size[0]}x{case.size[1]}, the DICOM is {h}x{w}")
    notes = list(case.notes)
    boxes: list[tuple[str, tuple[float, float, float, float]]] = []
    for f in positive:
        raw = [f.box] if f.box is not None else None
        if raw is None:
            if not f.roi_files:
                raise Skip(f"{f.ref}: ROI mask not found")
            try:
                raw, roi_notes = roi_boxes(f.roi_files, h, w, opts.speck_fraction)
            except Skip as e:
                raise Skip(f"{f.ref}: {e}") from e
            notes += [f"{f.ref}: {n}" for n in roi_notes]
        for b in raw:
            fitted = fit_box(b, h, w, opts.min_box)
            if fitted is None:
                raise Skip(f"{f.ref}: box {[round(v, 1) for v in b]} outside the {h}x{w} image")
            boxes.append((f.kind, fitted))
    scale = min(1.0, opts.max_size / max(h, w)) if opts.max_size else 1.0
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
    if (oh, ow) != (h, w):
        px = imaging.resize2d(px, oh, ow)  # [oh, ow]
    sx, sy = ow / w, oh / h
    file_name = f"{case.key}.png"
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    write_png16(out / "images" / split / file_name, px)
    return {"status": "converted", "file_name": file_name, "height": oh, "width": ow, "source_height": h,
            "source_width": w, "intensity": intensity, "categories": [k for k, _ in boxes],
            "boxes": [[x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy] for _, (x0, y0, x1, y1) in boxes],
            "labels": sorted({f.label for f in chosen}), "notes": notes}


def write_coco(out: Path, records: Sequence[dict[str, Any]], opts: Options, release: str) -> dict[str, dict[str, int]]:
    """``annotations/instances_{train,val,test}.json`` from the converted manifest records (ids by case key)."""
    cats = [{"id": i + 1, "name": k} for i, k in enumerate(opts.kinds)]
    cat_id = {c["name"]: c["id"] for c in cats}
    conv = sorted((r for r in records if r["status"] == "converted"), key=lambda r: r["case"])
    counts = {}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 0
    for split in SPLITS:
        images, anns = [], []
        for img_id, r in enumerate(conv, start=1):
            if r["split"] != split:
                continue
            images.append({"id": img_id, "file_name": r["file_name"], "height": r["height"], "width": r["width"]})
            for kind, box in zip(r["categories"], r["boxes"]):
                ann_id += 1
                anns.append({"id": ann_id, "image_id": img_id, "category_id": cat_id[kind], "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0})
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        write_json(out / "annotations" / f"instances_{split}.json",
                   {"info": {"description": f"converted from {release} by data_tools.mammo_releases"},
                    "images": images, "annotations": anns, "categories": cats})
        counts[split] = {"images": len(images), "annotations": len(anns)}
    return counts


def write_registry(out: Path) -> Path:
    """``out/registry.yaml``: the dataset under the name of its folder, for ``--set data.registry=FILE``
    (``ddsm`` and ``inbreast`` are registered already; any other name needs it)."""
    import yaml

    splits = {s: {"ann": f"annotations/instances_{s}.json", "images": f"images/{s}"} for s in SPLITS}
    path, tmp = out / "registry.yaml", out / ".registry.yaml.tmp"
    tmp.write_text(yaml.safe_dump({"datasets": {out.name: splits}}, sort_keys=False))
    os.replace(tmp, path)
    return path


def check_options(out: Path, saved: dict[str, Any]) -> None:
    """Refuse to resume into `out` with other options (splits and boxes would no longer agree)."""
    check_same_options(out / OPTIONS_FILE, saved, "converted")


def trim_partial_line(path: Path) -> None:
    """Drop a half-written last line (a killed run) so that appended records start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data[: data.rfind(b"\n") + 1])
        os.replace(tmp, path)
