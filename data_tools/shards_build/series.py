"""A DICOM series read slice by slice: one bad file never loses the series.

Every slice is read on its own. A slice that cannot be read, a second copy of a slice (same
SOPInstanceUID, or the same pixels at the same position) and a slice of another size are left out
and recorded; the volume is built from the rest. Where leaving slices out (or the acquisition
itself) breaks the geometry (a gap in the positions, uneven spacing), the series is split into
contiguous sub-volumes, each with its own even spacing: nothing is ever resampled across a gap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_tools.shards_build import burned_in
from medssl.data import imaging as im

SPACING_RTOL = 0.05  # neighbouring gaps further apart than 5 % of the series' spacing break the volume
SPACING_ATOL = 0.01  # mm


@dataclass
class SeriesParts:
    """What `read_series` made of a series.

    Attributes:
        volumes: contiguous sub-volumes in spatial order, each pixels [Z, H, W] with even spacing.
        files: the slice files of each volume, in the volume's order.
        left_out: one manifest record per file left out: {"input", "status", "reason"[, "duplicate_of",
            "burned_in"]}.
        split: why the series was cut into several volumes (None when it is one).
        burned_in: the burned-in records of slices kept at risk (blanked by OCR, or kept unchecked).
    """

    volumes: list[im.ImageData] = field(default_factory=list)
    files: list[list[str]] = field(default_factory=list)
    left_out: list[dict[str, Any]] = field(default_factory=list)
    split: str | None = None
    burned_in: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Slice:
    path: str
    image: im.ImageData  # pixels [H, W]
    sop: str
    position: float | None
    number: int
    burned_in: dict[str, Any] | None = None
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient


def _read_slice(path: str, policy: str) -> _Slice:
    """Read and decode one slice under the burned-in `policy`; raises `UnreadableImage` with a one-line
    reason (`burned_in.BurnedInText` when the policy leaves it out)."""
    try:
        ds = im.read_dicom_header(path)
        image, risk = burned_in.screen_dicom(path, ds, policy)
    except im.UnreadableImage:
        raise
    except FileNotFoundError as exc:
        raise im.UnreadableImage(path, f"file vanished: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - one bad slice must not stop the series
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()[:160]
        raise im.UnreadableImage(path, f"unexpected error: {line}") from exc
    if image.pixels.ndim != 2:
        raise im.UnreadableImage(path, "multi-frame file in a series of single-frame slices")
    position = im._slice_position(ds)  # the reader's own rule (position along the slice normal)
    ori = ds.get("ImageOrientationPatient")
    return _Slice(path, image, str(ds.get("SOPInstanceUID", "") or ""), position,
                  int(ds.get("InstanceNumber", 0) or 0), risk,
                  tuple(float(v) for v in ori) if ori is not None and len(ori) == 6 else None)


def _left(path: str, status: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"input": path, "status": status, "reason": reason, **extra}


def _resolve_copies(paths: list[str], parts: SeriesParts, policy: str) -> list[_Slice]:
    """Read every file; keep one readable copy of each slice, record the rest in `parts.left_out`."""
    read: dict[str, _Slice] = {}
    errors: dict[str, im.UnreadableImage] = {}
    for path in paths:
        try:
            read[path] = _read_slice(path, policy)
        except burned_in.BurnedInText as exc:
            parts.left_out.append(_left(path, exc.status, exc.reason, burned_in=[{"input": path, **exc.details}]))
        except im.UnreadableImage as exc:
            errors[path] = exc
    kept: list[_Slice] = []
    by_sop: dict[str, str] = {}
    by_content: dict[tuple[str, float | None], str] = {}
    for s in read.values():  # path order: the first readable copy is kept
        content = (hashlib.sha1(np.ascontiguousarray(s.image.pixels).tobytes()).hexdigest(), s.position)
        first = by_sop.get(s.sop) if s.sop else None
        if first is not None or content in by_content:
            why = "same SOPInstanceUID" if first is not None else "same pixels at the same position"
            parts.left_out.append(_left(s.path, "duplicate", f"{why} as a slice kept in the series",
                                        duplicate_of=first or by_content[content]))
            continue
        by_sop[s.sop] = by_content[content] = s.path
        kept.append(s)
    for path, exc in errors.items():
        sop = _sop_of(path)
        if sop and sop in by_sop:  # e.g. a partial download next to its complete copy
            parts.left_out.append(_left(path, "duplicate", f"same SOPInstanceUID as a slice kept in the series; "
                                        f"this copy is unreadable: {exc.reason}", duplicate_of=by_sop[sop]))
        else:
            parts.left_out.append(_left(path, "skipped" if exc.skip else "failed", exc.reason))
    return kept


def _sop_of(path: str) -> str:
    """SOPInstanceUID from the header of a file whose pixels did not read ('' when none)."""
    try:
        import pydicom

        return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - an unreadable header simply has no identity
        return ""


def _runs(positions: list[float]) -> tuple[list[list[int]], float | None]:
    """Split positions (descending) into runs of even spacing; returns index runs and the series' spacing."""
    gaps = -np.diff(np.asarray(positions, dtype=float))  # [Z-1], > 0 when slices are distinct
    if not len(gaps):
        return [list(range(len(positions)))], None
    spacing = float(np.median(gaps))
    runs, run = [], [0]
    for i, gap in enumerate(gaps):
        if spacing <= 0 or abs(gap - spacing) > SPACING_RTOL * spacing + SPACING_ATOL:
            runs.append(run)
            run = []
        run.append(i + 1)
    runs.append(run)
    return runs, (spacing if spacing > 0 else None)


def read_series(paths: list[str], min_slices: int = 1, policy: str = "exclude") -> SeriesParts:
    """Read a series' files one by one into contiguous sub-volumes (see the module docstring).

    Args:
        paths: the series' files (copies of a slice included), in a fixed order (sorted paths):
            of two readable copies the first is kept.
        min_slices: reported in the split note only (runs shorter than this are not resliced).
        policy: the burned-in text policy applied to each slice (`burned_in.POLICIES`).
    """
    parts = SeriesParts()
    kept = _resolve_copies(paths, parts, policy)
    if not kept:
        return parts
    shapes = Counter(s.image.pixels.shape for s in kept)
    shape = shapes.most_common(1)[0][0]
    for s in [s for s in kept if s.image.pixels.shape != shape]:
        size = "x".join(map(str, s.image.pixels.shape))
        parts.left_out.append(_left(s.path, "failed", f"slice size {size} differs from the series' "
                                    f"{shape[0]}x{shape[1]}"))
    kept = [s for s in kept if s.image.pixels.shape == shape]
    if any(s.position is None for s in kept):  # no geometry to check: order by InstanceNumber
        kept.sort(key=lambda s: s.number)
        runs, spacing = [list(range(len(kept)))], None
    else:
        kept.sort(key=lambda s: -s.position)  # head to feet for an axial CT, as `im.order_series`
        runs, spacing = _runs([s.position for s in kept])
    if len(runs) > 1:
        sizes = "+".join(str(len(r)) for r in runs)
        short = sum(len(r) < min_slices for r in runs)
        parts.split = (f"gaps or uneven spacing between slices (spacing {spacing} mm): split into {len(runs)} "
                       f"contiguous sub-volumes of {sizes} slices" + (f", {short} too short to reslice" if short
                                                                      else ""))
    for run in runs:
        members = [kept[i] for i in run]
        dz = _runs([s.position for s in members])[1] if len(members) > 1 and spacing else spacing
        first = members[0].image
        volume = np.stack([s.image.pixels for s in members])  # [Z, H, W]
        parts.volumes.append(im.ImageData(
            pixels=volume, spacing=(dz, *first.spacing), modality=first.modality, is_volume=True,
            photometric=first.photometric, voi=first.voi, voi_lut=first.voi_lut, body_part=first.body_part,
            uids={"study": first.uids["study"], "series": first.uids["series"],
                  "instance": [s.image.uids["instance"] for s in members]},
            source_format="dicom", bits=first.bits,
            direction=im.series_direction(members[0].orientation) if members[0].orientation and spacing
            else None, positions=[s.position for s in members] if spacing else None))
        parts.files.append([s.path for s in members])
        parts.burned_in += [{"input": s.path, **s.burned_in} for s in members if s.burned_in]
    return parts


def split_volume(img: im.ImageData) -> tuple[list[im.ImageData], str | None]:
    """Cut a volume whose planes carry positions (an enhanced multi-frame file) where they leave a gap or change
    spacing, by the same rule as a series (`_runs`); returns the sub-volumes and why (None: one volume)."""
    pos = img.positions
    if not img.is_volume or pos is None or len(pos) < 2:
        return [img], None
    runs, spacing = _runs(pos)
    if len(runs) == 1:
        return [img], None
    parts = []
    for run in runs:  # consecutive indices
        sub = [pos[i] for i in run]
        dz = _runs(sub)[1] if len(sub) > 1 else spacing
        parts.append(dataclasses.replace(img, pixels=img.pixels[run[0]:run[-1] + 1],
                                         spacing=(dz, *img.spacing[1:]), positions=sub))
    sizes = "+".join(str(len(r)) for r in runs)
    return parts, (f"gaps or uneven spacing between frames (spacing {spacing} mm): split into {len(runs)} "
                   f"contiguous sub-volumes of {sizes} frames")
