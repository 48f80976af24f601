"""One unit -> samples (runs in worker processes), and the pool that survives a dying worker."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from data_tools.shards_build import burned_in
from data_tools.shards_build.plan import Config, Unit, hash_id, quiet, slug
from data_tools.shards_build.series import read_series, split_volume
from medssl.data import imaging as im

Sample = tuple[str, np.ndarray, dict[str, Any]]  # key, image [S, S], metadata


def _read_unit(unit: Unit, policy: str) -> tuple[im.ImageData, dict[str, Any] | None]:
    """The unit's image after the burned-in policy, and its burned-in record (None: not at risk)."""
    path = unit.paths[0]
    if unit.kind == "nifti":
        return im.read_nifti(path, unit.modality), None
    if unit.kind == "raster":
        return burned_in.screen(path, burned_in.hint_risk(unit.modality), policy,
                                lambda: im.read_raster(path, unit.modality))
    ds = im.read_dicom_header(path)
    return burned_in.screen_dicom(path, ds, policy)


def _windows(img: im.ImageData, cfg: Config) -> Sequence[im.Window | None]:
    """The CT windows of the build for CT with HU values, else one pass with the modality's own rule."""
    use_windows = img.modality in im.CT_MODALITIES and img.source_format != "raster"  # pictures carry no HU
    return cfg.ct_windows if use_windows else (None,)


def _common_meta(unit: Unit, img: im.ImageData, cfg: Config) -> dict[str, Any]:
    """The de-identified metadata every sample of an input carries (UIDs salted and hashed)."""
    spacing = tuple(img.spacing) if img.pixels.ndim == 3 else (None, *img.spacing)
    return {"modality": img.modality, "body_part": img.body_part or unit.body_part, "source": unit.source,
            "format": img.source_format, "orig_shape": list(img.pixels.shape),
            "spacing": [None if s is None else round(float(s), 4) for s in spacing[-img.pixels.ndim:]],
            "photometric": img.photometric, "dtype": cfg.dtype,
            "study": hash_id(cfg.salt, img.uids.get("study")),
            "series": hash_id(cfg.salt, img.uids.get("series"))}


def volume_samples(unit: Unit, img: im.ImageData, cfg: Config, volume_tag: str = "") -> Iterator[Sample]:
    """(key, volume [D, H, W], meta) per CT window (one for other modalities) of a volume, for `--dims 3`.

    The volume is normalised as a 2-D sample would be (`im.normalise`: the same CT windows, MR percentiles),
    then resampled to `cfg.spacing` mm (`im.resample_volume`) and stored whole; the loader crops it. A 2-D
    image, a stack of independent frames, a volume of fewer than `cfg.min_volume_slices` slices or one of
    unknown spacing is refused with the reason (skipped / failed in the manifest).
    """
    where = unit.paths[0]
    if img.pixels.ndim != 3 or not img.is_volume:
        what = "a 2-D image" if img.pixels.ndim == 2 else "independent frames, not a volume"
        raise im.UnreadableImage(where, f"{what}: --dims 3 writes volumes only", skip=True)
    if img.pixels.shape[0] < cfg.min_volume_slices:
        raise im.UnreadableImage(where, f"volume of {img.pixels.shape[0]} slices (< --min-volume-slices "
                                 f"{cfg.min_volume_slices})", skip=True)
    if any(s is None for s in img.spacing):
        raise im.UnreadableImage(where, f"voxel spacing unknown ({list(img.spacing)}): cannot resample to mm")
    base = f"{slug(unit.source)}_{hash_id(cfg.salt, unit.uid)}"
    common = _common_meta(unit, img, cfg)
    common.update(source_spacing=common.pop("spacing"), spacing=[float(s) for s in cfg.spacing],
                  orientation=im.orientation_code(img.direction), direction=img.direction, dims=3)
    for window in _windows(img, cfg):
        x01, record = im.normalise(img, window)  # [D, H, W] in [0, 1]
        vol = im.resample_volume(x01, img.spacing, cfg.spacing)  # type: ignore[arg-type]
        if min(vol.shape[1:]) < cfg.min_size:
            shape = "x".join(str(n) for n in vol.shape)
            raise im.UnreadableImage(where, f"volume too small at {list(cfg.spacing)} mm ({shape}, in-plane < "
                                     f"{cfg.min_size} px)", skip=True)
        out = im.to_dtype(vol, cfg.dtype)  # [D', H', W']
        key = f"{base}_{volume_tag}vol" + (f"_{window.name.lower()}" if window is not None else "")
        yield key, out, {**common, "window": record, "shape": list(out.shape), "instance": None}


def samples(unit: Unit, img: im.ImageData, cfg: Config, volume_tag: str = "") -> Iterator[Sample]:
    """(key, image, meta) for every 2-D sample an input yields; `volume_tag` names a sub-volume in keys."""
    if cfg.dims == 3:
        yield from volume_samples(unit, img, cfg, volume_tag)
        return
    base = f"{slug(unit.source)}_{hash_id(cfg.salt, unit.uid)}"
    if min(img.pixels.shape[-2:]) < cfg.min_size:
        shape = "x".join(str(n) for n in img.pixels.shape[-2:])
        raise im.UnreadableImage(unit.paths[0], f"image too small ({shape} < {cfg.min_size} px)", skip=True)
    volume = img.pixels if img.pixels.ndim == 3 else img.pixels[None]  # [N, H, W]
    spacing = tuple(img.spacing) if img.pixels.ndim == 3 else (None, *img.spacing)
    is_volume = img.is_volume and volume.shape[0] >= cfg.min_volume_slices
    axes = cfg.axes if is_volume else (0,)
    windows = _windows(img, cfg)
    instances = img.uids.get("instance")
    common = _common_meta(unit, img, cfg)
    for window in windows:
        x01, record = im.normalise(img, window)
        x01 = x01 if x01.ndim == 3 else x01[None]  # [N, H, W]
        for axis in axes:
            slices = im.iter_slices(x01, spacing, axis=axis, step=cfg.every,
                                    min_foreground=cfg.min_foreground)
            for sl in slices:
                if min(sl.pixels.shape) < cfg.min_size:
                    continue
                out = im.to_dtype(im.resize_square(sl.pixels, cfg.size, cfg.fit), cfg.dtype)  # [S, S]
                h, w = sl.pixels.shape
                scale = (min(h, w) if cfg.fit == "crop" else max(h, w)) / cfg.size
                if isinstance(instances, list):
                    instance = instances[sl.index] if axis == 0 else None
                else:
                    instance = instances
                part = volume_tag + (f"a{axis}s{sl.index:04d}" if is_volume else f"f{sl.index:04d}")
                key = f"{base}_{part}" + (f"_{window.name.lower()}" if window is not None else "")
                meta = {**common, "window": record, "axis": axis if is_volume else None,
                        "index": sl.index, "plane_shape": [h, w],
                        "pixel_spacing": None if sl.spacing is None else round(sl.spacing * scale, 4),
                        "instance": hash_id(cfg.salt, instance)}
                yield key, out, meta


def unit_record(unit: Unit) -> dict[str, Any]:
    """The manifest fields that name a unit."""
    inputs = unit.paths[0] if len(unit.paths) == 1 else unit.paths
    return {"unit": unit.uid, "input": inputs, "kind": unit.kind, "source": unit.source}


def _series_samples(unit: Unit, record: dict[str, Any], cfg: Config) -> list[Sample]:
    """Samples of a DICOM series read slice by slice; fills the record's inputs, sub-volumes, left-out files."""
    parts = read_series(unit.paths, cfg.min_volume_slices, cfg.burned_in)
    record["input"] = [p for files in parts.files for p in files]
    record["left_out"] = [{"unit": f"slice:{r['input']}", "kind": "dicom", "source": unit.source,
                           "part_of": unit.uid, **r} for r in parts.left_out]
    if parts.burned_in:
        record["burned_in"] = parts.burned_in
    if not parts.volumes and parts.left_out and all(r["status"] == "burned-in" for r in parts.left_out):
        raise burned_in.BurnedInText(unit.paths[0], "every slice of the series left out by the burned-in policy",
                                     {})  # each slice's own line carries its record
    if not parts.volumes:
        reasons = sorted({r["reason"] for r in parts.left_out})
        raise im.UnreadableImage(unit.paths[0], f"no readable slice in the series ({'; '.join(reasons)[:160]})")
    record["modality"] = parts.volumes[0].modality
    if parts.split:
        record["split"] = parts.split
        record["volumes"] = [{"slices": len(files), "spacing": vol.spacing[0], "first": files[0]}
                             for vol, files in zip(parts.volumes, parts.files)]
    if cfg.dims == 2:
        tag = (lambda j: f"v{j}") if parts.split else (lambda j: "")
        return [s for j, vol in enumerate(parts.volumes) for s in samples(unit, vol, cfg, tag(j))]
    return _sub_volume_samples(unit, record, parts.volumes, bool(parts.split), cfg)


def _sub_volume_samples(unit: Unit, record: dict[str, Any], volumes: list[im.ImageData], split: bool,
                        cfg: Config) -> list[Sample]:
    """3-D samples of the contiguous sub-volumes of one input: one that cannot be used leaves the others in
    (its reason under `record["volumes"][j]["refused"]`); raises only when none can be used."""
    tag = (lambda j: f"v{j}") if split else (lambda j: "")
    found, refused = [], []
    for j, vol in enumerate(volumes):
        try:
            found += list(volume_samples(unit, vol, cfg, tag(j)))
        except im.UnreadableImage as exc:
            refused.append(exc)
            if "volumes" in record:
                record["volumes"][j]["refused"] = exc.reason
    if not found and refused:
        raise refused[0] if len(refused) == 1 else im.UnreadableImage(
            unit.paths[0], f"no usable sub-volume: {'; '.join(sorted({e.reason for e in refused}))[:200]}",
            skip=all(e.skip for e in refused))
    return found


def process_unit(unit: Unit, cfg: Config) -> dict[str, Any]:
    """Read, normalise and slice one unit; never raises (bad input becomes a failed record).

    Returns the unit's manifest record plus "samples" (and, for a series, "left_out": records of
    the slice files left out). An image at risk of burned-in text is handled by `cfg.burned_in` first
    (status "burned-in" when left out; its record, with any blanked regions, under "burned_in").
    """
    quiet()
    record = unit_record(unit)
    try:
        if unit.kind == "series":
            found = _series_samples(unit, record, cfg)
        else:
            img, risk = _read_unit(unit, cfg.burned_in)
            record["modality"] = img.modality
            if risk is not None:
                record["burned_in"] = [{"input": unit.paths[0], **risk}]
            if cfg.dims == 3:  # frames of an enhanced file are positioned: never resample across a gap
                volumes, split = split_volume(img)
                if split:
                    record["split"] = split
                    record["volumes"] = [{"slices": v.pixels.shape[0], "spacing": v.spacing[0]} for v in volumes]
                found = _sub_volume_samples(unit, record, volumes, bool(split), cfg)
            else:
                found = list(samples(unit, img, cfg))
        if not found:
            return {**record, "status": "skipped", "reason": "no non-empty slices", "samples": []}
        return {**record, "status": "written", "samples": found}
    except burned_in.BurnedInText as exc:
        details = {"burned_in": [{"input": exc.path, **exc.details}]} if exc.details else {}
        return {**record, "status": exc.status, "reason": exc.reason, "samples": [], **details}
    except im.UnreadableImage as exc:
        return {**record, "status": "skipped" if exc.skip else "failed", "reason": exc.reason, "samples": []}
    except FileNotFoundError as exc:
        return {**record, "status": "failed", "reason": f"file vanished: {exc}", "samples": []}
    except Exception as exc:  # noqa: BLE001 - bad input must never stop the job
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()[:160]
        return {**record, "status": "failed", "reason": f"unexpected error: {line}", "samples": []}


def results(units: list[Unit], cfg: Config, workers: int,
             fn: Callable[[Unit, Config], dict[str, Any]] = process_unit) -> Iterator[tuple[Unit, dict[str, Any]]]:
    """Results in input order; at most 2 * workers units in flight (memory bound by work in flight).

    A worker that dies (a codec segfault, the OOM killer) breaks the pool: the units that were in
    flight are then retried one at a time in a fresh process, and the one that kills its process
    again is recorded as failed; the job goes on.
    """
    if workers <= 0:
        for unit in units:
            yield unit, fn(unit, cfg)
        return
    ctx = mp.get_context("spawn")
    todo, suspects = deque(units), deque()
    while todo or suspects:
        if suspects:
            unit = suspects.popleft()
            with cf.ProcessPoolExecutor(1, mp_context=ctx) as solo:
                try:
                    yield unit, solo.submit(fn, unit, cfg).result()
                except BrokenProcessPool:
                    yield unit, {**unit_record(unit), "status": "failed", "samples": [],
                                 "reason": "worker process died while decoding (crash or out of memory)"}
            continue
        queue: deque[tuple[Unit, cf.Future]] = deque()
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            try:
                while todo or queue:
                    while todo and len(queue) < 2 * workers:
                        unit = todo.popleft()
                        queue.append((unit, pool.submit(fn, unit, cfg)))
                    result = queue[0][1].result()
                    yield queue.popleft()[0], result
            except BrokenProcessPool:
                suspects.extend(unit for unit, _ in queue)  # retried in order, before the rest
