"""What every release reader produces (`Case`, `Finding`), the conversion `Options`, splits by patient,
and the small table / folder helpers the readers share."""

from __future__ import annotations

import csv
import io
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("mass", "calcification")
SPLITS = ("train", "val", "test")


class Skip(Exception):
    """A case that is not converted; the message is the manifest's reason."""


@dataclass
class Finding:
    """One annotated abnormality of a mammogram.

    Attributes:
        kind: "mass" or "calcification".
        label: the release's own grading (CBIS-DDSM pathology, else BI-RADS), as normalised by `norm_label`.
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
    positive: tuple[str, ...] | None = None  # None: the release's default (MedMask's malignant lesions)
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
        if self.positive is not None:
            self.positive = tuple(norm_label(p) for p in self.positive)

    def is_positive(self, label: str) -> bool:
        """Whether a finding graded `label` (already `norm_label`-ed) becomes a box."""
        if self.positive is None:
            raise ValueError("Options.positive is None: convert() fills in the release's default; "
                             "pass the labels when calling a reader directly")
        return label in self.positive


def norm_label(text: str) -> str:
    """Normalise a grading: 'BI-RADS 4' / '4A ' -> '4a'; pathologies upper case ('MALIGNANT')."""
    t = str(text).strip()
    m = re.fullmatch(r"(?i)(?:bi-?rads)?\s*([0-6])\s*([abc]?)", t)
    return f"{m.group(1)}{m.group(2).lower()}" if m else t.upper()


def dicoms_under(dirs: Iterable[Path]) -> list[Path]:
    """Every .dcm / .dicom file below the folders, sorted."""
    return sorted({p for d in dirs for p in d.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom")})


def folder_index(src: Path) -> dict[str, list[Path]]:
    """Every folder below `src` by its name (TCIA trees are matched on the case folder name)."""
    index: dict[str, list[Path]] = defaultdict(list)
    for dirpath, dirnames, _ in os.walk(src):
        for d in dirnames:
            index[d].append(Path(dirpath) / d)
    return index


def find_one(src: Path, name: str) -> Path:
    """The first file called `name` below `src` (release tables sit at different depths); FileNotFoundError."""
    hits = sorted(src.rglob(name))
    if not hits:
        raise FileNotFoundError(f"{name} not found under {src}")
    return hits[0]


def read_table(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of a CSV with stripped column names and values (release tables carry stray spaces); UTF-8 with
    or without a byte-order mark, else Latin-1."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def require_columns(rows: list[dict[str, str]], cols: Sequence[str], path: Path) -> None:
    """ValueError naming the table and the missing columns (or that it has no rows)."""
    have = list(rows[0]) if rows else []
    missing = [c for c in cols if c not in have]
    if not rows or missing:
        raise ValueError(f"{path}: {'no rows' if not rows else f'columns {missing} not found; it has {have}'}")


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
