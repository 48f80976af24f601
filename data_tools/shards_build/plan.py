"""Planning a build: options, input discovery, grouping files into units, assignment to parts."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing as mp
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.shards_build import burned_in
from medssl.data import imaging as im

DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")


@dataclass(frozen=True)
class Config:
    """Options of one build; the same values must be given to resume a killed build."""

    size: int = 224
    fit: str = "crop"
    dtype: str = "uint8"
    axes: tuple[int, ...] = (0,)
    every: int = 1
    min_foreground: float = 0.05
    ct_windows: tuple[im.Window, ...] = (im.Window("wide", -1000.0, 1000.0),)
    min_volume_slices: int = 8
    min_size: int = 32
    salt: str = ""
    burned_in: str = "exclude"  # burned-in text policy: "exclude" | "ocr" | "keep" (see `burned_in`)
    dims: int = 2  # 2: planes resized to `size`; 3: whole volumes resampled to `spacing` (see `worker.volume_samples`)
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # mm per stored axis [D, H, W] of a 3-D sample

    def __post_init__(self) -> None:
        if self.burned_in not in burned_in.POLICIES:
            raise ValueError(f"--burned-in: expected one of {', '.join(burned_in.POLICIES)}, got {self.burned_in!r}")
        if self.dims not in (2, 3):
            raise ValueError(f"--dims: expected 2 or 3, got {self.dims!r}")
        if len(self.spacing) != 3 or not all(float(s) > 0 for s in self.spacing):
            raise ValueError(f"--spacing: expected 3 positive values in mm, got {self.spacing!r}")

    def recorded(self) -> dict[str, Any]:
        """The options as recorded in `build_config.json` (salt left out; 3-D options only for a 3-D build, so
        that 2-D builds made before they existed still resume)."""
        from dataclasses import asdict

        out = {k: v for k, v in asdict(self).items() if k != "salt"}
        if self.dims == 2:
            del out["dims"], out["spacing"]
        return out


@dataclass
class Unit:
    """One piece of work: a single file or a DICOM series; `uid` names it in the manifest.

    `part_key` decides which part of a split build (`--part I/N`) does the unit: the image's
    identity (salted SOPInstanceUID or content hash) where known, so that copies of one image meet in
    the same part and are written once, else the path relative to its source folder.
    """

    kind: str  # "dicom" | "series" | "nifti" | "raster" | "unsupported"
    paths: list[str]
    source: str
    modality: str | None = None
    body_part: str | None = None
    uid: str = ""
    status: str | None = None  # preset for duplicates / unsupported files
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    part_key: str = ""


def hash_id(salt: str, value: Any) -> str | None:
    """Salted SHA-256 of an identifier (16 hex characters); None for empty values."""
    if value in (None, "", []):
        return None
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """Lower-case [a-z0-9-] version of a name, safe inside a WebDataset key."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "src"


def parse_windows(text: str) -> tuple[im.Window, ...]:
    """Parse CT windows: `name=LOW:HIGH` (HU bounds) or `name=LEVEL/WIDTH`, comma separated.

    Example:
        >>> [(w.name, w.low, w.high) for w in parse_windows("wide=-1000:1000,soft=40/400")]
        [('wide', -1000.0, 1000.0), ('soft', -160.0, 240.0)]
    """
    windows = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, spec = part.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9]+", name):
            raise ValueError(f"--ct-windows: {part!r} is not NAME=LOW:HIGH or NAME=LEVEL/WIDTH "
                             "(NAME letters and digits)")
        try:
            if "/" in spec:
                level, width = (float(v) for v in spec.split("/"))
                windows.append(im.Window.from_level_width(name, level, width))
            else:
                low, high = (float(v) for v in spec.split(":"))
                windows.append(im.Window(name, low, high))
        except ValueError as exc:
            raise ValueError(f"--ct-windows: bad window {part!r}: {exc}") from exc
    if not windows:
        raise ValueError("--ct-windows: no window given")
    if len({w.name for w in windows}) != len(windows):
        raise ValueError(f"--ct-windows: duplicate window names in {text!r}")
    return tuple(windows)


def parse_spacing(text: str) -> tuple[float, float, float]:
    """Parse `--spacing`: one value in mm (isotropic) or three, for the stored axes [D, H, W].

    Example:
        >>> parse_spacing("1.5"), parse_spacing("3,1,1")
        ((1.5, 1.5, 1.5), (3.0, 1.0, 1.0))
    """
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError as exc:
        raise ValueError(f"--spacing: expected MM or D,H,W in mm, got {text!r}") from exc
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(f"--spacing: expected one or three positive values in mm, got {text!r}")
    return values  # type: ignore[return-value]


def parse_part(text: str) -> tuple[int, int]:
    """Parse `--part I/N` (0 <= I < N) into (I, N).

    Example:
        >>> parse_part("2/8")
        (2, 8)
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"--part: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def part_of(unit: Unit, parts: int) -> int:
    """The part (0 .. parts-1) that does `unit`: a stable hash of its `part_key` (same on every machine)."""
    digest = hashlib.sha256(unit.part_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % parts


def file_kind(path: Path) -> str:
    """'nifti', 'raster', 'dicom' (by suffix or the DICM marker) or 'unsupported'."""
    name = path.name.lower()
    if name.endswith(im.NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(im.RASTER_SUFFIXES):
        return "raster"
    if path.suffix.lower() in DICOM_SUFFIXES or (path.suffix and not path.suffix[1:].isalpha()):
        return "dicom"  # "", .dcm, and numbered names such as 1.2.840.113619.2.55
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return "unsupported"
    return "dicom" if head[128:132] == b"DICM" else "unsupported"


def discover(specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Files under each source spec ({name, path, modality, body_part}), sorted, one dict per file."""
    found = []
    for spec in specs:
        root = Path(spec["path"]).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"source {spec['name']!r}: {root} does not exist")
        files = [root] if root.is_file() else sorted(
            Path(d) / f for d, dirs, fs in os.walk(root) for f in fs if not dirs.sort())
        for path in files:
            if path.name.startswith(".") or "__pycache__" in path.parts:
                continue
            rel = path.name if root.is_file() else path.relative_to(root).as_posix()
            found.append({"path": str(path), "source": spec["name"], "modality": spec.get("modality"),
                          "body_part": spec.get("body_part"), "kind": file_kind(path), "rel": rel})
    return found


def quiet() -> None:
    """Silence pydicom's per-file warnings in this (worker) process: a batch job over thousands of
    archive files would print them by the hundred; what matters ends up in the manifest."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\..*")
    import logging

    logging.getLogger("pydicom").setLevel(logging.ERROR)


def scan_one(item: dict[str, Any]) -> dict[str, Any]:
    """Identity of one file for grouping and duplicate detection (runs in a worker)."""
    quiet()
    out = {"real": os.path.realpath(item["path"])}
    if item["kind"] != "dicom":
        if item["kind"] in ("nifti", "raster"):
            h = hashlib.sha1()
            with open(item["path"], "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out["content"] = h.hexdigest()
        return out
    try:
        import pydicom

        ds = pydicom.dcmread(item["path"], stop_before_pixels=True, force=True)
        single = int(ds.get("NumberOfFrames", 1) or 1) == 1
        out.update(sop=str(ds.get("SOPInstanceUID", "") or ""),
                   series=str(ds.get("SeriesInstanceUID", "") or ""),
                   modality=str(ds.get("Modality", "") or "").upper(),
                   positioned=single and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds)
    except Exception:  # noqa: BLE001 - unreadable files are reported when processed
        pass
    return out


def scan(files: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """`scan_one` of every file, in worker processes when there are many."""
    if workers <= 0 or len(files) < 64:
        return [scan_one(f) for f in files]
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(scan_one, files, chunksize=32))


def plan_units(files: list[dict[str, Any]], scans: list[dict[str, Any]], cfg: Config) -> list[Unit]:
    """Group files into units: DICOM series of >= `min_volume_slices` distinct positioned slices become
    one volume unit; everything else is one unit per file.

    The same real file reached twice becomes a 'duplicate' unit here. Copies of a slice inside a
    series (same SOPInstanceUID) stay in the series unit: which copy is kept depends on which one
    reads (`series.read_series`). Each unit carries salted identity ids (SOPInstanceUIDs, or the
    content hash of NIfTI / raster files): the build writes an image only once, from the first unit
    that decodes (a duplicate of a file that fails is still used).
    """
    units: list[Unit] = []
    seen_real: dict[str, str] = {}
    series: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}

    def sop_id(scan: dict[str, Any]) -> str | None:
        return f"sop:{hash_id(cfg.salt, scan['sop'])}" if scan.get("sop") else None

    def file_unit(item: dict[str, Any], scan: dict[str, Any], ident: str | None, modality: str | None) -> Unit:
        return Unit(kind=item["kind"], paths=[item["path"]], source=item["source"], modality=modality,
                    body_part=item["body_part"], uid=f"file:{scan['real']}", extra={"ids": [ident] if ident else []},
                    part_key=ident or f"path:{item['source']}/{item['rel']}")

    for item, scan in zip(files, scans):
        if scan["real"] in seen_real:
            first = seen_real[scan["real"]]
            units.append(Unit(kind=item["kind"], paths=[item["path"]], source=item["source"],
                              uid=f"dup:{item['path']}", status="duplicate", reason="same file as an earlier input",
                              extra={"duplicate_of": first}, part_key=f"path:{item['source']}/{item['rel']}"))
            continue
        seen_real[scan["real"]] = item["path"]
        if (item["kind"] == "dicom" and scan.get("positioned") and scan.get("series")
                and scan.get("modality") in im.VOLUME_MODALITIES):
            series.setdefault((item["source"], scan["series"]), []).append((item, scan))
            continue
        ident = sop_id(scan) or (f"content:{scan['content']}" if scan.get("content") else None)
        unit = file_unit(item, scan, ident, item["modality"])
        if item["kind"] == "unsupported":
            unit.status = "skipped"
            unit.reason = f"unsupported file type ({Path(item['path']).suffix or 'no suffix'})"
        units.append(unit)
    for (source, series_uid), members in series.items():
        ids = sorted({i for _, scan in members if (i := sop_id(scan))})
        if len(ids) < cfg.min_volume_slices:  # single images; duplicates are resolved when written
            units.extend(file_unit(item, scan, sop_id(scan), scan["modality"]) for item, scan in members)
            continue
        uid = f"series:{source}:{hash_id(cfg.salt, series_uid)}"
        units.append(Unit(kind="series", paths=[item["path"] for item, _ in members], source=source,
                          modality=members[0][1]["modality"], body_part=members[0][0]["body_part"],
                          uid=uid, extra={"ids": ids}, part_key=uid))
    return units
