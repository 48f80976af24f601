"""VinDr-Mammo: ``finding_annotations.csv`` and ``images/<study_id>/<image_id>.dicom``."""

from __future__ import annotations

import ast
from pathlib import Path

from data_tools.coco_layout import table_number
from data_tools.mammo_releases.cases import Case, Finding, Options, find_one, norm_label, read_table, require_columns

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
    table = find_one(src, "finding_annotations.csv")
    rows = read_table(table)
    require_columns(rows, VINDR_COLUMNS, table)
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
            h, w = table_number(row, "height", line, table), table_number(row, "width", line, table)
            box = [table_number(row, c, line, table) for c in ("xmin", "ymin", "xmax", "ymax")]
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
        label = norm_label(row["finding_birads"])
        for kind in dict.fromkeys(kinds):
            case.findings.append(Finding(kind, label, opts.is_positive(label), box=tuple(box),  # type: ignore[arg-type]
                                         ref=f"{table.name}:{line}"))
    return [cases[k] for k in sorted(cases)]
