"""Build LUMID WebDataset shards from DICOM files / series, NIfTI volumes and PNG/JPEG/TIFF folders.

    python -m data_tools.build_shards SRC [SRC ...] --out DIR [options]
    python -m data_tools.build_shards --sources data_tools/lumid_sources.yaml --out DIR

Writes `DIR/lumid-NNNNNN.tar` (per sample `KEY.npy` 2-D uint8/uint16 + `KEY.json`, de-identified),
`DIR/_info.json`, `DIR/manifest.jsonl` (one line per input file or series: written / skipped / failed /
duplicate, with the reason), `DIR/stats.json` and `DIR/contact_<MODALITY>.png`.

A killed run restarted with the same arguments finishes the job: finished shards are kept, the
temporary shard of the killed run is deleted, and inputs already in the manifest are not redone (an
input's manifest line is only written once all its samples are in finished shards).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import secrets
import sys
import traceback
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data import imaging as im
from medssl.data.shard_writer import (
    ShardWriter,
    finished_shards,
    next_shard_index,
    read_sample,
    remove_partial_shards,
    shard_keys,
    write_info,
)

MANIFEST = "manifest.jsonl"
STATS = "stats.json"
STATS_DIR = ".stats"
SALT_FILE = ".salt"
DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")
HIST_BINS = 64
SHEET_SAMPLES = 16
DEFAULT_CT_WINDOWS = "wide=-1000:1000"


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


@dataclass
class Unit:
    """One piece of work: a single file or a DICOM series; `uid` names it in the manifest."""

    kind: str  # "dicom" | "series" | "nifti" | "raster" | "unsupported"
    paths: list[str]
    source: str
    modality: str | None = None
    body_part: str | None = None
    uid: str = ""
    status: str | None = None  # preset for duplicates / unsupported files
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- helpers


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
            found.append({"path": str(path), "source": spec["name"], "modality": spec.get("modality"),
                          "body_part": spec.get("body_part"), "kind": file_kind(path)})
    return found


def _quiet() -> None:
    """Silence pydicom's per-file warnings in this (worker) process: a batch job over thousands of
    archive files would print them by the hundred; what matters ends up in the manifest."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\..*")
    import logging

    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _scan_one(item: dict[str, Any]) -> dict[str, Any]:
    """Identity of one file for grouping and duplicate detection (runs in a worker)."""
    _quiet()
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


def plan_units(files: list[dict[str, Any]], scans: list[dict[str, Any]], cfg: Config) -> list[Unit]:
    """Group files into units: DICOM series of >= `min_volume_slices` positioned slices become one
    volume unit; everything else is one unit per file.

    The same real file reached twice, and a slice repeated inside a series (same SOPInstanceUID),
    become 'duplicate' units here. Each unit carries salted identity ids (SOPInstanceUIDs, or the
    content hash of NIfTI / raster files): the build writes an image only once, from the first unit
    that decodes (a duplicate of a file that fails is still used).
    """
    units: list[Unit] = []
    seen_real: dict[str, str] = {}
    series: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}

    def duplicate(item: dict[str, Any], of: str, why: str) -> Unit:
        return Unit(kind=item["kind"], paths=[item["path"]], source=item["source"], uid=f"dup:{item['path']}",
                    status="duplicate", reason=why, extra={"duplicate_of": of})

    for item, scan in zip(files, scans):
        if scan["real"] in seen_real:
            units.append(duplicate(item, seen_real[scan["real"]], "same file as an earlier input"))
            continue
        seen_real[scan["real"]] = item["path"]
        ident = (f"sop:{hash_id(cfg.salt, scan['sop'])}" if scan.get("sop")
                 else f"content:{scan['content']}" if scan.get("content") else None)
        unit = Unit(kind=item["kind"], paths=[item["path"]], source=item["source"], modality=item["modality"],
                    body_part=item["body_part"], uid=f"file:{scan['real']}",
                    extra={"ids": [ident] if ident else []})
        if item["kind"] == "unsupported":
            unit.status = "skipped"
            unit.reason = f"unsupported file type ({Path(item['path']).suffix or 'no suffix'})"
        elif (item["kind"] == "dicom" and scan.get("positioned") and scan.get("series")
              and scan.get("modality") in im.VOLUME_MODALITIES):
            series.setdefault((item["source"], scan["series"]), []).append((item, scan))
            continue
        units.append(unit)
    for (source, series_uid), members in series.items():
        by_sop: dict[str, str] = {}
        kept, dups = [], []
        for item, scan in members:
            if scan.get("sop") and scan["sop"] in by_sop:
                dups.append(duplicate(item, by_sop[scan["sop"]], "same SOPInstanceUID as an earlier slice"))
                continue
            by_sop[scan.get("sop") or item["path"]] = item["path"]
            kept.append((item, scan))
        ids = [f"sop:{hash_id(cfg.salt, scan['sop'])}" for _, scan in kept if scan.get("sop")]
        if len(kept) < cfg.min_volume_slices:  # single images; duplicates are resolved when written
            kept = members
        else:
            units.extend(dups)
            units.append(Unit(kind="series", paths=[m[0]["path"] for m in kept], source=source,
                              modality=kept[0][1]["modality"], body_part=kept[0][0]["body_part"],
                              uid=f"series:{source}:{hash_id(cfg.salt, series_uid)}", extra={"ids": ids}))
            continue
        units.extend(Unit(kind="dicom", paths=[item["path"]], source=source, modality=scan["modality"],
                          body_part=item["body_part"], uid=f"file:{scan['real']}",
                          extra={"ids": [f"sop:{hash_id(cfg.salt, scan['sop'])}"] if scan.get("sop") else []})
                     for item, scan in kept)
    return units


# ------------------------------------------------------------------------------- per-unit worker


def _read_unit(unit: Unit) -> im.ImageData:
    if unit.kind == "series":
        return im.read_dicom_series(unit.paths, label=f"{unit.paths[0]} (+{len(unit.paths) - 1} slices)")
    if unit.kind == "nifti":
        return im.read_nifti(unit.paths[0], unit.modality)
    if unit.kind == "raster":
        return im.read_raster(unit.paths[0], unit.modality)
    return im.read_dicom(unit.paths[0])


def _samples(unit: Unit, img: im.ImageData, cfg: Config) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """(key, image, meta) for every 2-D sample an input yields."""
    base = f"{slug(unit.source)}_{hash_id(cfg.salt, unit.uid)}"
    if min(img.pixels.shape[-2:]) < cfg.min_size:
        shape = "x".join(str(n) for n in img.pixels.shape[-2:])
        raise im.UnreadableImage(unit.paths[0], f"image too small ({shape} < {cfg.min_size} px)", skip=True)
    volume = img.pixels if img.pixels.ndim == 3 else img.pixels[None]  # [N, H, W]
    spacing = tuple(img.spacing) if img.pixels.ndim == 3 else (None, *img.spacing)
    is_volume = img.is_volume and volume.shape[0] >= cfg.min_volume_slices
    axes = cfg.axes if is_volume else (0,)
    use_windows = img.modality in im.CT_MODALITIES and img.source_format != "raster"  # pictures carry no HU
    windows: Sequence[im.Window | None] = cfg.ct_windows if use_windows else (None,)
    instances = img.uids.get("instance")
    common = {"modality": img.modality, "body_part": img.body_part or unit.body_part, "source": unit.source,
              "format": img.source_format, "orig_shape": list(img.pixels.shape),
              "spacing": [None if s is None else round(float(s), 4) for s in spacing[-img.pixels.ndim:]],
              "photometric": img.photometric, "dtype": cfg.dtype,
              "study": hash_id(cfg.salt, img.uids.get("study")),
              "series": hash_id(cfg.salt, img.uids.get("series"))}
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
                part = f"a{axis}s{sl.index:04d}" if is_volume else f"f{sl.index:04d}"
                key = f"{base}_{part}" + (f"_{window.name.lower()}" if window is not None else "")
                meta = {**common, "window": record, "axis": axis if is_volume else None,
                        "index": sl.index, "plane_shape": [h, w],
                        "pixel_spacing": None if sl.spacing is None else round(sl.spacing * scale, 4),
                        "instance": hash_id(cfg.salt, instance)}
                yield key, out, meta


def _record(unit: Unit) -> dict[str, Any]:
    """The manifest fields that name a unit."""
    inputs = unit.paths[0] if len(unit.paths) == 1 else unit.paths
    return {"unit": unit.uid, "input": inputs, "kind": unit.kind, "source": unit.source}


def process_unit(unit: Unit, cfg: Config) -> dict[str, Any]:
    """Read, normalise and slice one unit; never raises (bad input becomes a failed record)."""
    _quiet()
    record = _record(unit)
    try:
        img = _read_unit(unit)
        samples = list(_samples(unit, img, cfg))
        record["modality"] = img.modality
        if not samples:
            return {**record, "status": "skipped", "reason": "no non-empty slices", "samples": []}
        return {**record, "status": "written", "samples": samples}
    except im.UnreadableImage as exc:
        return {**record, "status": "skipped" if exc.skip else "failed", "reason": exc.reason, "samples": []}
    except FileNotFoundError as exc:
        return {**record, "status": "failed", "reason": f"file vanished: {exc}", "samples": []}
    except Exception as exc:  # noqa: BLE001 - bad input must never stop the job
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()[:160]
        return {**record, "status": "failed", "reason": f"unexpected error: {line}", "samples": []}


# ---------------------------------------------------------------------------------- stats / sheets


def shard_stats(path: Path) -> dict[str, Any]:
    """Counts per modality / source, per-modality intensity histograms and sample keys of one shard."""
    import tarfile

    by_mod: Counter[str] = Counter()
    by_src: Counter[str] = Counter()
    hists: dict[str, np.ndarray] = {}
    keys: dict[str, list[str]] = {}
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[: -len(".json")]
            fh_meta, fh_npy = tar.extractfile(members[name]), tar.extractfile(members[f"{key}.npy"])
            assert fh_meta is not None and fh_npy is not None
            meta = json.loads(fh_meta.read())
            arr = np.load(io.BytesIO(fh_npy.read()), allow_pickle=False)
            mod = meta.get("modality", "?")
            by_mod[mod] += 1
            by_src[meta.get("source", "?")] += 1
            top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0
            counts, _ = np.histogram(arr / top, bins=HIST_BINS, range=(0.0, 1.0))
            hists[mod] = hists.get(mod, np.zeros(HIST_BINS, np.int64)) + counts
            keys.setdefault(mod, []).append(key)
    return {"shard": path.name, "by_modality": dict(by_mod), "by_source": dict(by_src),
            "histograms": {m: h.tolist() for m, h in hists.items()}, "keys": keys}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _record_shard_stats(out: Path, record: dict[str, Any]) -> None:
    (out / STATS_DIR).mkdir(exist_ok=True)
    _write_json(out / STATS_DIR / f"{record['name']}.json", shard_stats(out / record["name"]))


def read_manifest(out: Path) -> list[dict[str, Any]]:
    """Manifest records; a half-written last line of a killed run is ignored."""
    path = out / MANIFEST
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def finish_stats(out: Path, seed: int = 0) -> dict[str, Any]:
    """Merge per-shard stats and the manifest into `stats.json`; draw contact sheets per modality."""
    by_mod: Counter[str] = Counter()
    by_src: Counter[str] = Counter()
    hists: dict[str, np.ndarray] = {}
    keys: dict[str, list[tuple[str, str]]] = {}
    for shard in finished_shards(out):
        cache = out / STATS_DIR / f"{shard.name}.json"
        st = json.loads(cache.read_text()) if cache.exists() else shard_stats(shard)
        by_mod.update(st["by_modality"])
        by_src.update(st["by_source"])
        for m, h in st["histograms"].items():
            hists[m] = hists.get(m, np.zeros(HIST_BINS, np.int64)) + np.asarray(h)
        for m, ks in st["keys"].items():
            keys.setdefault(m, []).extend((shard.name, k) for k in ks)
    records = read_manifest(out)
    status = Counter(r["status"] for r in records)
    reasons = Counter(r["reason"] for r in records if r.get("reason") and r["status"] != "written")
    stats = {"samples": sum(by_mod.values()), "by_modality": dict(by_mod), "by_source": dict(by_src),
             "inputs": dict(status), "reasons": dict(reasons.most_common()),
             "histograms": {m: {"range": [0.0, 1.0], "bins": HIST_BINS, "counts": h.tolist()}
                            for m, h in sorted(hists.items())}}
    _write_json(out / STATS, stats)
    rng = random.Random(seed)
    for mod, cands in sorted(keys.items()):
        _contact_sheet(out, mod, rng.sample(cands, min(SHEET_SAMPLES, len(cands))))
    return stats


def _contact_sheet(out: Path, modality: str, picks: list[tuple[str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (shard, key) in zip(axes.ravel(), picks):
        arr, meta = read_sample(out / shard, key)
        ax.imshow(arr, cmap="gray", vmin=0, vmax=np.iinfo(arr.dtype).max)
        ax.set_title(f"{meta['source'][:14]} {meta.get('window', {}).get('name', '')}", fontsize=6)
    fig.suptitle(f"{modality}: {len(picks)} random samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"contact_{slug(modality).upper()}.png", dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------ the build


def _results(units: list[Unit], cfg: Config, workers: int,
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
                    yield unit, {**_record(unit), "status": "failed", "samples": [],
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


def _scan(files: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    if workers <= 0 or len(files) < 64:
        return [_scan_one(f) for f in files]
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_scan_one, files, chunksize=32))


def build(specs: Sequence[dict[str, Any]], out: str | os.PathLike, cfg: Config, *, workers: int = 0,
          samples_per_shard: int = 1000, dry_run: bool = False, progress: bool = True,
          max_units: int | None = None) -> dict[str, Any]:
    """Build (or resume building) shards in `out` from source specs; returns the run summary.

    Args:
        specs: [{"name": ..., "path": ..., "modality": hint or None, "body_part": hint or None}].
        out: output folder.
        cfg: reading / normalisation / slicing options (use the same to resume).
        workers: worker processes (0: in this process).
        samples_per_shard: samples per tar shard.
        dry_run: only plan; write nothing.
        progress: show a tqdm progress bar.
        max_units: stop after this many units (a partial build; run again to continue).
    """
    out = Path(out)
    files = discover(specs)
    units = plan_units(files, _scan(files, workers), cfg)
    done = {r["unit"] for r in read_manifest(out)} if out.exists() else set()
    todo = [u for u in units if u.uid not in done]
    summary: dict[str, Any] = {"files": len(files), "units": len(units),
                               "already_done": len(units) - len(todo), "todo": len(todo),
                               "kinds": dict(Counter(u.kind for u in todo))}
    if dry_run:
        summary["preset"] = dict(Counter(u.status for u in todo if u.status))
        return summary
    todo = todo[:max_units] if max_units is not None else todo
    out.mkdir(parents=True, exist_ok=True)
    summary["removed_partial"] = [p.name for p in remove_partial_shards(out)]
    _check_config(out, cfg)
    existing = {k for shard in finished_shards(out) for k in shard_keys(shard)}
    manifest = open(out / MANIFEST, "a", buffering=1)
    pending: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        manifest.write(json.dumps(rec, sort_keys=True) + "\n")
        manifest.flush()

    def on_close(shard_record: dict[str, Any]) -> None:
        _record_shard_stats(out, shard_record)
        for rec in pending:  # every sample of these inputs is now in finished shards
            emit(rec)
        pending.clear()

    writer = ShardWriter(out, samples_per_shard, start_index=next_shard_index(out), on_close=on_close)
    run = Counter()
    preset = [u for u in todo if u.status]
    work = [u for u in todo if not u.status]
    for unit in preset:
        rec = {**_record(unit), "status": unit.status, "reason": unit.reason, **unit.extra, "ids": []}
        emit(rec)
        run[unit.status] += 1
    bar = _progress(len(work), progress)
    written_ids = {i: r["input"] for r in read_manifest(out) if r["status"] == "written"
                   for i in r.get("ids", [])}
    for unit, result in _results(work, cfg, workers):
        samples = result.pop("samples")
        ids = unit.extra.get("ids", [])
        result["ids"] = ids
        first = next((written_ids[i] for i in ids if i in written_ids), None)
        if result["status"] == "written" and first is not None:
            result.update(status="duplicate", reason="same SOPInstanceUID or content as an earlier input",
                          duplicate_of=first)
            samples = []
        elif result["status"] == "written":
            written_ids.update((i, result["input"]) for i in ids)
        keys = []
        for key, arr, meta in samples:
            keys.append(key)
            if key not in existing:
                writer.write(key, arr, meta)
                existing.add(key)
        result["keys"], result["n_samples"] = keys, len(keys)
        run[result["status"]] += 1
        run["samples"] += len(keys)
        if writer.pending_keys:
            pending.append(result)
        else:
            emit(result)
        bar.update(1)
        bar.set_postfix(samples=run["samples"], failed=run["failed"], skipped=run["skipped"], refresh=False)
    bar.close()
    writer.close()
    manifest.close()
    summary["this_run"] = dict(run)
    summary["stats"] = finish_stats(out)
    write_info(out)
    return summary


def _check_config(out: Path, cfg: Config) -> None:
    """Refuse to resume into `out` with different options (the salt itself is never written)."""
    config = {k: v for k, v in asdict(cfg).items() if k != "salt"}
    config["salt_sha256"] = hashlib.sha256(cfg.salt.encode()).hexdigest()
    config = json.loads(json.dumps(config))  # tuples -> lists, Windows -> dicts
    path = out / "build_config.json"
    if path.exists():
        before = json.loads(path.read_text())
        diff = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
        if diff:
            raise ValueError(f"{out} was built with other options ({', '.join(diff)} differ): "
                             "use the same options to resume, or a new --out")
    else:
        _write_json(path, config)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="input", disable=not enabled, dynamic_ncols=True, mininterval=1.0)


# ------------------------------------------------------------------------------------------- CLI


def load_sources(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Collections of a sources YAML whose path exists, and the names of those that do not."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--sources: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("collections") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"--sources: {path} must hold a 'collections:' list")
    found, missing = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("path"):
            raise ValueError(f"--sources: {path} collection #{i} needs 'name' and 'path'")
        where = Path(str(entry["path"])).expanduser()
        where = where if where.is_absolute() else path.parent / where  # relative to the YAML file
        spec = {"name": str(entry["name"]), "path": str(where),
                "modality": entry.get("modality"), "body_part": entry.get("body_part")}
        (found if Path(spec["path"]).exists() else missing).append(spec if Path(spec["path"]).exists()
                                                                   else spec["name"])
    return found, missing


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The build options (shared with `data_tools.demo_lumid`)."""
    parser.add_argument("--size", type=int, default=224, help="output side in pixels (default 224)")
    parser.add_argument("--fit", choices=("crop", "pad"), default="crop",
                        help="shorter side to SIZE + centre crop, or longer side + pad (default crop)")
    parser.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8")
    parser.add_argument("--axes", default="0", help="volume slice axes: 0 (acquisition plane), 1, 2, "
                        "comma list or 'all' (default 0)")
    parser.add_argument("--every", type=int, default=1, help="take every k-th slice / frame (default 1)")
    parser.add_argument("--min-foreground", type=float, default=0.05,
                        help="skip slices with less than this fraction of non-background pixels (0.05)")
    parser.add_argument("--ct-windows", default=DEFAULT_CT_WINDOWS,
                        help="CT HU windows, NAME=LOW:HIGH or NAME=LEVEL/WIDTH, comma separated; one "
                        f"sample per window (default {DEFAULT_CT_WINDOWS}; e.g. wide=-1000:1000,soft=40/400)")
    parser.add_argument("--min-volume-slices", type=int, default=8,
                        help="DICOM series / volumes with fewer slices are not resliced (default 8)")
    parser.add_argument("--min-size", type=int, default=32,
                        help="skip images / planes whose shorter side is below this (default 32 px)")
    parser.add_argument("--salt", default=None, help="salt for hashing UIDs (default: a random salt kept "
                        f"in OUT/{SALT_FILE}; keep it private)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="worker processes (0: none)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--dry-run", action="store_true", help="plan and print counts, write nothing")
    parser.add_argument("--max-units", type=int, default=None, help="stop after N inputs (resume later)")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace, out: Path) -> Config:
    """Validate the options and make a `Config` (reads or creates the salt file)."""
    if args.size < 8:
        raise ValueError(f"--size must be >= 8, got {args.size}")
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    if not 0.0 <= args.min_foreground < 1.0:
        raise ValueError(f"--min-foreground must be in [0, 1), got {args.min_foreground}")
    if args.samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    text = str(args.axes).strip().lower()
    try:
        axes = (0, 1, 2) if text == "all" else tuple(sorted({int(a) for a in text.split(",")}))
    except ValueError as exc:
        raise ValueError(f"--axes: expected 0, 1, 2, a comma list or 'all', got {args.axes!r}") from exc
    if not axes or any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"--axes: expected 0, 1, 2, a comma list or 'all', got {args.axes!r}")
    salt = args.salt
    if salt is None:
        salt_path = out / SALT_FILE
        if salt_path.exists():
            salt = salt_path.read_text().strip()
        elif not args.dry_run:
            out.mkdir(parents=True, exist_ok=True)
            salt = secrets.token_hex(16)
            salt_path.write_text(salt + "\n")
        else:
            salt = ""
    return Config(size=args.size, fit=args.fit, dtype=args.dtype, axes=axes, every=args.every,
                  min_foreground=args.min_foreground, ct_windows=parse_windows(args.ct_windows),
                  min_volume_slices=args.min_volume_slices, min_size=args.min_size, salt=salt)


def run_build(specs: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Run a build from parsed arguments and print the summary; returns the exit code."""
    out = Path(args.out)
    cfg = config_from_args(args, out)
    summary = build(specs, out, cfg, workers=args.workers, samples_per_shard=args.samples_per_shard,
                    dry_run=args.dry_run, progress=not args.no_progress, max_units=args.max_units)
    print_summary(summary, out, cfg)
    return 0


def print_summary(summary: dict[str, Any], out: Path, cfg: Config) -> None:
    """Human-readable end-of-run summary."""
    print(f"inputs: {summary['files']} files -> {summary['units']} units "
          f"({summary['already_done']} already done, {summary['todo']} to do) kinds={summary['kinds']}")
    if "stats" not in summary:
        print(f"dry run: nothing written; preset={summary.get('preset')}")
        return
    stats = summary["stats"]
    print(f"this run: {summary['this_run']}")
    print(f"total in {out}: {stats['samples']} samples; by modality {stats['by_modality']}; "
          f"inputs {stats['inputs']}")
    for reason, n in list(stats["reasons"].items())[:12]:
        print(f"  {n:5d} x {reason}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.build_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="*", help="folders or files (DICOM, NIfTI, PNG/JPEG/TIFF)")
    parser.add_argument("--sources", help="YAML listing collections (name, modality, body_part, path)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--source-name", default=None, help="collection name for SRC (default: folder name)")
    parser.add_argument("--modality", default=None, help="modality hint for NIfTI / raster SRC (e.g. MR, DX)")
    parser.add_argument("--body-part", default=None, help="body part hint for SRC")
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    specs = []
    for src in args.src:
        p = Path(src)
        if not p.exists():
            parser.error(f"SRC {src}: no such file or folder")
        specs.append({"name": args.source_name or (p.name if p.is_dir() else p.parent.name) or "src",
                      "path": str(p), "modality": args.modality, "body_part": args.body_part})
    if args.sources:
        try:
            found, missing = load_sources(args.sources)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(str(exc))
        for name in missing:
            print(f"collection {name}: path not found, skipped", file=sys.stderr)
        specs.extend(found)
    if not specs:
        parser.error("nothing to read: give SRC folders/files or a --sources file with existing paths")
    try:
        return run_build(specs, args)
    except ValueError as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
