"""Convert public mammography releases (CBIS-DDSM, INbreast, VinDr-Mammo) to the MedMask seed COCO layout.

    python -m data_tools.coco_tools from-cbis-ddsm CBIS-DDSM/ --out DATA_ROOT/ddsm
    python -m data_tools.coco_tools from-inbreast "INbreast Release 1.0/" --out DATA_ROOT/inbreast
    python -m data_tools.coco_tools from-vindr vindr-mammo/1.0.0/ --out DATA_ROOT/vindr

Each release is first read into :class:`Case` records (one per mammogram: patient, release split, DICOM,
findings); :func:`convert` then does the rest the same way for all three: splits by patient, DICOM ->
16-bit PNG through ``medssl.data.imaging`` (modality LUT, VOI LUT / window, MONOCHROME1), boxes from
the release's annotations (CBIS-DDSM: connected components of the ROI masks), an optional maximum size
with boxes scaled alike, ``manifest.jsonl`` (one line per case: converted / skipped + why), resume after
a kill, ``annotations/instances_{train,val,test}.json`` and ``coco_tools.validate`` at the end.

Defaults follow MedMask's malignant-lesion sets: masses only; a mass is a positive (a box) when it is
MALIGNANT (CBIS-DDSM pathology) or its BI-RADS is 4, 4a, 4b, 4c, 5 or 6 (INbreast image BI-RADS,
VinDr-Mammo finding BI-RADS); images whose masses are all benign are kept without boxes; images with no
mass at all ("normals") are left out unless ``--include-normals``.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import plistlib
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.coco_tools import _num, validate
from data_tools.shards_build.report import MANIFEST, read_manifest, write_json
from medssl.data import imaging

RELEASES = ("cbis-ddsm", "inbreast", "vindr")
KINDS = ("mass", "calcification")
SPLITS = ("train", "val", "test")
BIRADS_SUSPICIOUS = ("4", "4a", "4b", "4c", "5", "6")
DEFAULT_POSITIVE = {"cbis-ddsm": ("MALIGNANT",), "inbreast": BIRADS_SUSPICIOUS, "vindr": BIRADS_SUSPICIOUS}
OPTIONS_FILE = "convert_options.json"


class Skip(Exception):
    """A case that is not converted; the message is the manifest's reason."""


@dataclass
class Finding:
    """One annotated abnormality of a mammogram.

    Attributes:
        kind: "mass" or "calcification".
        label: the release's own grading (CBIS-DDSM pathology, else BI-RADS), as normalised by `_label`.
        positive: whether it becomes a box (label in the positive set).
        box: (x0, y0, x1, y1) in source pixels, or None when it comes from ROI masks.
        roi_files: CBIS-DDSM: every DICOM found for the abnormality's crop and mask (told apart by content).
        ref: how messages name it (e.g. "abnormality 2").
    """

    kind: str
    label: str
    positive: bool
    box: tuple[float, float, float, float] | None = None
    roi_files: list[str] = field(default_factory=list)
    ref: str = ""


@dataclass
class Case:
    """One mammogram of a release: `key` names its PNG (``<key>.png``) and its manifest line."""

    key: str
    patient: str
    image: str | None
    split: str | None  # the release's own split ("train" / "test"), None where it has none
    findings: list[Finding] = field(default_factory=list)
    problem: str | None = None  # found while reading the release: the case is skipped with this reason
    size: tuple[int, int] | None = None  # (height, width) the annotations refer to, where the release says
    notes: list[str] = field(default_factory=list)


@dataclass
class Options:
    """What becomes a box, which images are kept, how splits are drawn and images written."""

    kinds: tuple[str, ...] = ("mass",)
    positive: tuple[str, ...] = ()
    keep_negatives: bool = True
    include_normals: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    max_size: int | None = None
    min_box: float = 8.0
    speck_fraction: float = 0.01

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds must be among {KINDS}, got {self.kinds}")
        for name in ("val_fraction", "test_fraction", "speck_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_size is not None and self.max_size < 8:
            raise ValueError(f"max_size must be >= 8 pixels, got {self.max_size}")
        if self.min_box < 0:
            raise ValueError(f"min_box must be >= 0, got {self.min_box}")


def _label(text: str) -> str:
    """Normalise a grading: 'BI-RADS 4' / '4A ' -> '4a'; pathologies upper case ('MALIGNANT')."""
    t = str(text).strip()
    m = re.fullmatch(r"(?i)(?:bi-?rads)?\s*([0-6])\s*([abc]?)", t)
    return f"{m.group(1)}{m.group(2).lower()}" if m else t.upper()


def _dicoms_under(dirs: Iterable[Path]) -> list[Path]:
    return sorted({p for d in dirs for p in d.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom")})


def _folder_index(src: Path) -> dict[str, list[Path]]:
    """Every folder below `src` by its name (TCIA trees are matched on the case folder name)."""
    index: dict[str, list[Path]] = defaultdict(list)
    for dirpath, dirnames, _ in os.walk(src):
        for d in dirnames:
            index[d].append(Path(dirpath) / d)
    return index


def _find_one(src: Path, name: str) -> Path:
    hits = sorted(src.rglob(name))
    if not hits:
        raise FileNotFoundError(f"{name} not found under {src}")
    return hits[0]


def _read_table(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of a CSV with stripped column names (release tables carry stray spaces)."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _require(rows: list[dict[str, str]], cols: Sequence[str], path: Path) -> None:
    have = list(rows[0]) if rows else []
    missing = [c for c in cols if c not in have]
    if not rows or missing:
        raise ValueError(f"{path}: {'no rows' if not rows else f'columns {missing} not found; it has {have}'}")


# ------------------------------------------------------------------------------------------ CBIS-DDSM
CBIS_TABLES = {"mass": "mass_case_description_{}_set.csv", "calcification": "calc_case_description_{}_set.csv"}
CBIS_COLUMNS = ("patient_id", "left or right breast", "image view", "abnormality id", "pathology",
                "image file path", "cropped image file path", "ROI mask file path")


def _cbis_files(src: Path, index: dict[str, list[Path]], csv_path: str) -> tuple[list[Path], str]:
    """DICOMs for a CSV path: the exact file when it exists, else every DICOM below the folder named like
    the path's first part (the case folder; the UID folders after it differ from the downloaded tree)."""
    exact = src / csv_path
    if csv_path and exact.is_file():
        return [exact], "exact"
    folder = csv_path.replace("\\", "/").split("/")[0]
    return _dicoms_under(index.get(folder, [])), folder


def cbis_ddsm_cases(src: str | Path, opts: Options) -> list[Case]:
    """Cases of a CBIS-DDSM download: the case-description CSVs of `opts.kinds` and the TCIA DICOM tree.

    One image (patient, side, view) may carry several abnormalities and appear in both the mass and the
    calcification tables: they are merged into one case. Pathology is the finding's label.
    """
    src = Path(src)
    index = _folder_index(src)
    cases: dict[str, Case] = {}
    for kind in opts.kinds:
        for split in ("train", "test"):
            path = _find_one(src, CBIS_TABLES[kind].format(split))
            rows = _read_table(path)
            _require(rows, CBIS_COLUMNS, path)
            for line, row in enumerate(rows, start=2):
                side, view = row["left or right breast"].upper(), row["image view"].upper()
                key = f"{row['patient_id']}_{side}_{view}"
                case = cases.get(key)
                if case is None:
                    case = cases[key] = Case(key, row["patient_id"], None, split)
                if split == "test":
                    case.split = "test"
                if case.image is None:
                    files, where = _cbis_files(src, index, row["image file path"])
                    if not files:
                        case.problem = (f"full mammogram not found: no DICOM under a folder named {where!r} "
                                        f"({path.name}:{line})")
                    else:
                        case.image, case.problem = str(max(files, key=lambda p: p.stat().st_size)), None
                        if len(files) > 1:
                            case.notes.append(f"{len(files)} DICOMs under {where}: took the largest")
                rois: list[Path] = []
                for col in ("ROI mask file path", "cropped image file path"):
                    rois += _cbis_files(src, index, row[col])[0]
                label = _label(row["pathology"])
                case.findings.append(Finding(kind, label, label in opts.positive,
                                             roi_files=sorted({str(p) for p in rois}),
                                             ref=f"{kind} abnormality {row['abnormality id']} ({path.name}:{line})"))
    return [cases[k] for k in sorted(cases)]


def _is_binary(px: np.ndarray) -> bool:
    lo, hi = float(px.min()), float(px.max())
    return bool(np.all((px == lo) | (px == hi)))


def roi_boxes(files: Sequence[str], height: int, width: int, speck_fraction: float = 0.01
              ) -> tuple[list[tuple[float, float, float, float]], list[str]]:
    """Boxes (x0, y0, x1, y1, image pixels) of the connected components of an abnormality's ROI mask.

    The mask is told from the cropped image by its values (two levels), whatever the CSV called it; a
    mask of another size than the mammogram has its boxes scaled to it. Components smaller than
    `speck_fraction` of the largest are dropped. Raises `Skip` when no mask is found.
    """
    from scipy import ndimage

    masks, notes = [], []
    for f in files:
        try:
            px = imaging.read_dicom(f).pixels
        except imaging.UnreadableImage as e:
            if "constant image" in e.reason:
                notes.append(f"{Path(f).name}: empty mask ignored")
            else:
                notes.append(f"{Path(f).name}: {e.reason}")
            continue
        if px.ndim == 3:
            px = px[0]
        if _is_binary(px):
            masks.append((f, px > px.min()))
    if not masks:
        raise Skip(f"no ROI mask (two-valued DICOM) among {len(files)} file(s)" + (f": {notes}" if notes else ""))
    # the one whose aspect ratio is closest to the mammogram's; the crop was already set apart by its values
    f, mask = min(masks, key=lambda m: abs(m[1].shape[0] / m[1].shape[1] - height / width))
    if len(masks) > 1:
        notes.append(f"{len(masks)} two-valued ROI files: used {Path(f).name}")
    mh, mw = mask.shape
    sy, sx = height / mh, width / mw
    if (mh, mw) != (height, width):
        notes.append(f"mask {mh}x{mw} scaled to the image {height}x{width}")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))  # 8-connected components
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))  # [n]
    keep = sizes >= speck_fraction * sizes.max()
    if (~keep).any():
        notes.append(f"{int((~keep).sum())} speck component(s) dropped")
    boxes = [(sl[1].start * sx, sl[0].start * sy, sl[1].stop * sx, sl[0].stop * sy)
             for sl, k in zip(ndimage.find_objects(labels), keep) if k]
    return boxes, notes


# ------------------------------------------------------------------------------------------- INbreast
INBREAST_NAME = re.compile(r"(?i)^(\d+)_([0-9a-f]+)_MG_([LR])_([A-Z]+)_ANON\.dcm$")
INBREAST_KIND = {"mass": "mass", "calcification": "calcification", "calcifications": "calcification",
                 "cluster": "calcification"}


def inbreast_rois(xml_path: Path) -> list[tuple[str, list[tuple[float, float]]]]:
    """(name, [(x, y), ...]) of every ROI of an INbreast OsiriX plist XML (``Images[].ROIs[].Point_px``)."""
    try:
        with xml_path.open("rb") as fh:
            plist = plistlib.load(fh)
    except Exception as e:  # noqa: BLE001 - plistlib / expat raise several types for broken files
        raise Skip(f"unreadable ROI XML {xml_path.name} ({type(e).__name__}: {str(e)[:80]})") from e
    out = []
    for image in plist.get("Images", []) if isinstance(plist, dict) else []:
        for roi in image.get("ROIs", []):
            pts = []
            for s in roi.get("Point_px", []):
                nums = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(s))
                if len(nums) >= 2:
                    pts.append((float(nums[0]), float(nums[1])))
            out.append((str(roi.get("Name", "")).strip(), pts))
    return out


def inbreast_cases(src: str | Path, opts: Options) -> list[Case]:
    """Cases of an INbreast release: ``AllDICOMs/*.dcm``, ``AllXML/<id>.xml`` and ``INbreast.csv``.

    The patient is the hash in the file name (``<id>_<patient hash>_MG_<L|R>_<view>_ANON.dcm``; the CSV's
    patient column is blanked in the public release); every finding takes the image's BI-RADS.
    """
    src = Path(src)
    table = _find_one(src, "INbreast.csv")
    rows = _read_table(table, delimiter=";")
    _require(rows, ("File Name", "Bi-Rads"), table)
    birads = {r["File Name"]: _label(r["Bi-Rads"]) for r in rows if r["File Name"]}
    xmls = {p.stem: p for p in src.rglob("*.xml")}
    cases = []
    for dcm in sorted(src.rglob("*.dcm")):
        m = INBREAST_NAME.match(dcm.name)
        if m is None:
            cases.append(Case(dcm.stem, dcm.stem, str(dcm), None,
                              problem="name is not <id>_<hash>_MG_<L|R>_<view>_ANON.dcm"))
            continue
        image_id, patient = m.group(1), m.group(2)
        case = Case(image_id, patient, str(dcm), None)
        cases.append(case)
        if image_id not in birads:
            case.problem = f"no row for {image_id} in {table.name}"
            continue
        if image_id not in xmls:
            continue  # no ROI file: no findings
        try:
            rois = inbreast_rois(xmls[image_id])
        except Skip as e:
            case.problem = str(e)
            continue
        other = Counter()
        for name, pts in rois:
            kind = INBREAST_KIND.get(name.lower())
            if kind is None or not pts:
                other[name or "unnamed"] += 1
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            case.findings.append(Finding(kind, birads[image_id], birads[image_id] in opts.positive,
                                         box=(min(xs), min(ys), max(xs), max(ys)), ref=f"ROI {name!r}"))
        if other:
            case.notes.append(f"ROIs not used: {dict(other)}")
    return cases


# ---------------------------------------------------------------------------------------- VinDr-Mammo
VINDR_COLUMNS = ("image_id", "study_id", "height", "width", "finding_categories", "finding_birads",
                 "xmin", "ymin", "xmax", "ymax", "split")
VINDR_KIND = {"mass": "mass", "suspicious calcification": "calcification"}


def _categories(text: str) -> list[str]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text.strip("[]").split(",")
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip().strip("'\"").lower() for v in values if str(v).strip()]


def vindr_cases(src: str | Path, opts: Options) -> list[Case]:
    """Cases of VinDr-Mammo: ``finding_annotations.csv`` (one row per finding, or a 'No Finding' row) and
    ``images/<study_id>/<image_id>.dicom``; the study is the patient, ``split`` is training / test.

    A finding listed as both Mass and Suspicious Calcification gives one finding of each kind (the same box
    twice under ``--kinds both``). Findings of other categories (asymmetry, distortion, ...) are ignored.
    """
    src = Path(src)
    table = _find_one(src, "finding_annotations.csv")
    rows = _read_table(table)
    _require(rows, VINDR_COLUMNS, table)
    found: dict[str, Path] | None = None
    cases: dict[str, Case] = {}
    for line, row in enumerate(rows, start=2):
        image_id = row["image_id"]
        case = cases.get(image_id)
        if case is None:
            path = src / "images" / row["study_id"] / f"{image_id}.dicom"
            if not path.is_file():
                if found is None:
                    found = {p.stem: p for p in src.rglob("*.dicom")}
                path = found.get(image_id, path)
            split = {"training": "train", "train": "train", "test": "test"}.get(row["split"].lower())
            case = cases[image_id] = Case(image_id, row["study_id"], str(path), split)
            if split is None:
                case.problem = f"{table.name}:{line}: unknown split {row['split']!r}"
        try:
            h, w = _num(row, "height", line, table), _num(row, "width", line, table)
            box = [_num(row, c, line, table) for c in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as e:
            case.problem = str(e)
            continue
        if h and w:
            case.size = (int(h), int(w))
        kinds = [VINDR_KIND[c] for c in _categories(row["finding_categories"]) if c in VINDR_KIND]
        if not kinds:
            continue  # 'No Finding' or findings of other kinds (asymmetry, distortion, ...)
        if any(v is None for v in box):
            case.problem = f"{table.name}:{line}: finding {kinds} without a complete box"
            continue
        label = _label(row["finding_birads"])
        for kind in dict.fromkeys(kinds):
            case.findings.append(Finding(kind, label, label in opts.positive, box=tuple(box),  # type: ignore[arg-type]
                                         ref=f"{table.name}:{line}"))
    return [cases[k] for k in sorted(cases)]


READERS = {"cbis-ddsm": cbis_ddsm_cases, "inbreast": inbreast_cases, "vindr": vindr_cases}


# ------------------------------------------------------------------------------------------- splits
def assign_splits(cases: Sequence[Case], opts: Options) -> dict[str, tuple[str, str | None]]:
    """Split of every case by patient: ``{key: (split, note)}``.

    A patient with any case in the release's test split goes wholly to test (a patient in both the
    train and test tables would otherwise leak). Releases without splits get a test set of
    `test_fraction` of the patients; validation is `val_fraction` of the training patients (at least one
    when there are two or more). Patients are drawn with a seeded generator from their sorted ids.
    """
    rng = np.random.default_rng(opts.seed)
    by_patient: dict[str, set[str | None]] = defaultdict(set)
    for c in cases:
        by_patient[c.patient].add(c.split)
    split_of: dict[str, str] = {}
    notes: dict[str, str] = {}
    for p, s in by_patient.items():
        if "test" in s:
            split_of[p] = "test"
            if "train" in s:
                notes[p] = "patient also in the release's test split: moved to test"
        elif "train" in s:
            split_of[p] = "train"

    def carve(pool: list[str], fraction: float, name: str) -> None:
        n = max(1, round(len(pool) * fraction)) if fraction > 0 and len(pool) >= 2 else 0
        for i in rng.permutation(len(pool))[:n]:
            split_of[pool[i]] = name

    unsplit = sorted(p for p in by_patient if p not in split_of)
    for p in unsplit:
        split_of[p] = "train"
    carve(unsplit, opts.test_fraction, "test")
    carve(sorted(p for p, s in split_of.items() if s == "train"), opts.val_fraction, "val")
    return {c.key: (split_of[c.patient], notes.get(c.patient)) for c in cases}


# ------------------------------------------------------------------------------------------ convert
def _write_png16(path: Path, img01: np.ndarray) -> None:
    """16-bit PNG written to a temporary name, then moved into place."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(imaging.to_dtype(img01, "uint16")).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def _fit_box(box: Sequence[float], h: int, w: int, min_box: float) -> tuple[float, float, float, float] | None:
    """Clip to the image and grow to at least `min_box` per side about its centre (point ROIs)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0 or x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
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
    return max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)


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
            fitted = _fit_box(b, h, w, opts.min_box)
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
    _write_png16(out / "images" / split / file_name, px)
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


def _check_options(out: Path, saved: dict[str, Any]) -> None:
    """Refuse to resume into `out` with other options (splits and boxes would no longer agree)."""
    path = out / OPTIONS_FILE
    if path.exists():
        before = json.loads(path.read_text())
        diff = sorted(k for k in set(before) | set(saved) if before.get(k) != saved.get(k))
        if diff:
            raise ValueError(f"{out} was converted with other options ({', '.join(diff)} differ): "
                             "use the same options to resume, or a new --out")
    else:
        write_json(path, saved)


def _trim_partial_line(path: Path) -> None:
    """Drop a half-written last line (a killed run) so that appended records start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data[: data.rfind(b"\n") + 1])
        os.replace(tmp, path)


def convert(release: str, src: str | Path, out: str | Path, opts: Options, *, progress: bool = True
            ) -> dict[str, Any]:
    """Convert a downloaded release to ``out`` (DATA_ROOT/NAME); resumable; returns a summary.

    Cases already in ``out/manifest.jsonl`` are not redone (delete a line to retry that case). Bad or
    missing files skip their case with the reason in the manifest. Ends with ``coco_tools.validate``.
    """
    from tqdm import tqdm

    if release not in READERS:
        raise ValueError(f"release must be one of {RELEASES}, got {release!r}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"release folder not found: {src}")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("images/*/.*.tmp"):  # a PNG being written when a run was killed
        stale.unlink()
    _check_options(out, json.loads(json.dumps({"release": release, **asdict(opts)})))
    cases = READERS[release](src, opts)
    splits = assign_splits(cases, opts)
    _trim_partial_line(out / MANIFEST)
    done = {r["case"] for r in read_manifest(out)}
    todo = [c for c in cases if c.key not in done]
    with open(out / MANIFEST, "a", buffering=1) as manifest, \
            tqdm(total=len(cases), initial=len(cases) - len(todo), unit="image", disable=not progress,
                 dynamic_ncols=True, mininterval=1.0, desc=release) as bar:
        for case in todo:
            split, split_note = splits[case.key]
            head = {"case": case.key, "patient": case.patient, "split": split, "source": case.image}
            try:
                rec = {**head, **convert_case(case, split, out, opts)}
                if split_note:
                    rec["notes"].append(split_note)
            except Skip as e:
                rec = {**head, "status": "skipped", "reason": str(e)}
            except (OSError, ValueError, MemoryError) as e:  # an unexpected bad file: record it and go on
                rec = {**head, "status": "skipped", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
            manifest.write(json.dumps(rec, sort_keys=True) + "\n")
            bar.update(1)
    records = [r for r in read_manifest(out) if r["case"] in splits]
    counts = write_coco(out, records, opts, release)
    report = validate(out)
    return {"counts": counts, "converted": sum(r["status"] == "converted" for r in records),
            "skipped": Counter(r["reason"] for r in records if r["status"] == "skipped"),
            "validate": report}


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser, release: str) -> None:
    """Options of one ``from-<release>`` subcommand."""
    p.add_argument("src", help="the downloaded release folder")
    p.add_argument("--out", required=True, help="DATA_ROOT/NAME folder to write (e.g. DATA_ROOT/ddsm)")
    p.add_argument("--kinds", choices=("mass", "calcification", "both"), default="mass",
                   help="findings that become boxes (default mass)")
    p.add_argument("--positive", default=",".join(DEFAULT_POSITIVE[release]),
                   help="comma-separated labels that make a finding a box: CBIS-DDSM pathology "
                        "(MALIGNANT, BENIGN, BENIGN_WITHOUT_CALLBACK), else BI-RADS (1..6, 4a..4c); "
                        f"default {','.join(DEFAULT_POSITIVE[release])} (MedMask's malignant lesions)")
    p.add_argument("--drop-negatives", action="store_true",
                   help="leave out images whose findings are all non-positive (default: kept without boxes)")
    p.add_argument("--include-normals", action="store_true",
                   help="keep images without any finding of the chosen kinds (as images without boxes)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="training patients moved to val")
    if release == "inbreast":
        p.add_argument("--test-fraction", type=float, default=0.2, help="patients for test (INbreast has no split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient draws")
    p.add_argument("--max-size", type=int, default=None, help="longest side in pixels (boxes scaled alike)")
    p.add_argument("--min-box", type=float, default=8.0, help="smallest box side in source pixels (point ROIs)")
    p.add_argument("--no-progress", action="store_true")


def run(release: str, args: argparse.Namespace) -> int:
    """Run one converter from parsed arguments; prints the counts and the validation; 0 when valid."""
    kinds = KINDS if args.kinds == "both" else (args.kinds,)
    positive = tuple(_label(s) for s in args.positive.split(",") if s.strip())
    try:
        opts = Options(kinds=kinds, positive=positive, keep_negatives=not args.drop_negatives,
                       include_normals=args.include_normals, val_fraction=args.val_fraction,
                       test_fraction=getattr(args, "test_fraction", 0.0), seed=args.seed, max_size=args.max_size,
                       min_box=args.min_box)
        summary = convert(release, args.src, args.out, opts, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, n in summary["counts"].items():
        print(f"instances_{split}.json: {n['images']} images, {n['annotations']} boxes")
    print(f"{summary['converted']} converted, {sum(summary['skipped'].values())} skipped "
          f"(reasons in {Path(args.out) / MANIFEST})")
    for reason, n in summary["skipped"].most_common(10):
        print(f"  {n:5d}  {reason}")
    report = summary["validate"]
    for e in report.errors:
        print(f"error: {e}")
    print(f"validate: {'OK' if report.ok else 'FAILED'} ({len(report.errors)} errors, {len(report.warnings)} warnings)")
    return 0 if report.ok else 1
