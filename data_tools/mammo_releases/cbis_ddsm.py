"""CBIS-DDSM (TCIA): the case-description CSVs, the downloaded DICOM tree and the ROI masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_tools.mammo_releases.cases import (
    Case,
    Finding,
    Options,
    Skip,
    dicoms_under,
    find_one,
    folder_index,
    norm_label,
    read_table,
    require_columns,
)
from medssl.data import imaging

CBIS_TABLES = {"mass": "mass_case_description_{}_set.csv", "calcification": "calc_case_description_{}_set.csv"}
CBIS_COLUMNS = ("patient_id", "left or right breast", "image view", "abnormality id", "pathology",
                "image file path", "cropped image file path", "ROI mask file path")
# A mask of another size is scaled to the mammogram only if its aspect ratio is within 5%: the reported
# mismatches keep it (fjeg/ddsm_tools#5: Mass-Test_P_00145_LEFT_CC mask 4386x1789, image 5041x2056).
MAX_ASPECT_CHANGE = 0.05


def _cbis_files(src: Path, index: dict[str, list[Path]], csv_path: str) -> tuple[list[Path], str]:
    """DICOMs for a CSV path: the exact file when it exists, else every DICOM below the folder named like
    the path's first part (the case folder; the UID folders after it differ from the downloaded tree)."""
    exact = src / csv_path
    if csv_path and exact.is_file():
        return [exact], "exact"
    folder = csv_path.replace("\\", "/").split("/")[0]
    return dicoms_under(index.get(folder, [])), folder


def cbis_ddsm_cases(src: str | Path, opts: Options) -> list[Case]:
    """Cases of a CBIS-DDSM download: the case-description CSVs of `opts.kinds` and the TCIA DICOM tree.

    One image (patient, side, view) may carry several abnormalities and appear in both the mass and the
    calcification tables: they are merged into one case. Pathology is the finding's label.
    """
    src = Path(src)
    index = folder_index(src)
    cases: dict[str, Case] = {}
    for kind in opts.kinds:
        for split in ("train", "test"):
            path = find_one(src, CBIS_TABLES[kind].format(split))
            rows = read_table(path)
            require_columns(rows, CBIS_COLUMNS, path)
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
                label = norm_label(row["pathology"])
                case.findings.append(Finding(kind, label, opts.is_positive(label),
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
    mask of another size than the mammogram has its boxes scaled to it (if its aspect ratio is within 5%,
    else `Skip`). Components smaller than
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
    if abs(sy / sx - 1.0) > MAX_ASPECT_CHANGE:  # not the same picture resampled: the boxes would be wrong
        raise Skip(f"ROI mask {Path(f).name} is {mh}x{mw}, another shape than the {height}x{width} image")
    if (mh, mw) != (height, width):
        notes.append(f"mask {mh}x{mw} scaled to the image {height}x{width}")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))  # 8-connected components
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # [n] pixels per component
    keep = sizes >= speck_fraction * sizes.max()
    if (~keep).any():
        notes.append(f"{int((~keep).sum())} speck component(s) dropped")
    boxes = [(sl[1].start * sx, sl[0].start * sy, sl[1].stop * sx, sl[0].stop * sy)
             for sl, k in zip(ndimage.find_objects(labels), keep) if k]
    return boxes, notes
