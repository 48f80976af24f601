"""Data throughput: reading LUMID shards versus decoding the same images from DICOM on the fly.

    python -m benchmarks.bench_data [--quick]

Both paths produce the same training inputs from the same real DICOM files (pydicom's and
pydicom-data's CT, MR, CR and US images, compressed and uncompressed), in one process:

- `shards_loader`: `medssl.data.shards.make_loader` over shards built by `data_tools.build_shards`
  (npy decode + random resized crop + normalisation, i.e. the pretraining input pipeline);
- `shards_raw`: plain tar + `np.load` of the same shards (the I/O and decode part alone);
- `dicom_on_the_fly`: `medssl.data.imaging` read + modality LUT / window + resize per sample, the
  work the shard builder does once, redone for every sample.

    python -m benchmarks.bench_data --resume

times the loader's first batch after resuming at step 0, S and 100 x S (`start_step`) on synthetic
shards: resuming seeks by the shards' sizes, so the three should be about the same.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FILES = ("CT_small.dcm", "MR_small.dcm", "693_J2KR.dcm", "693_UNCR.dcm", "MR2_J2KR.dcm", "RG3_J2KR.dcm",
         "US1_J2KR.dcm", "RG1_UNCR.dcm")
SIZE = 224


def _sources(folder: Path) -> list[Path]:
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in FILES:
        src = get_testdata_file(name)
        if src is None:
            continue
        dst = folder / name
        dst.write_bytes(Path(src).read_bytes())
        paths.append(dst)
    if not paths:
        raise FileNotFoundError("none of the benchmark DICOM files is installed (pydicom / pydicom-data)")
    return paths


def _on_the_fly(paths: list[Path], n: int) -> float:
    from medssl.data import imaging as im

    window = im.Window("wide", -1000.0, 1000.0)
    t0 = time.perf_counter()
    for i in range(n):
        img = im.read_image(paths[i % len(paths)])
        x01, _ = im.normalise(img, window if img.modality in im.CT_MODALITIES else None)
        x01 = x01 if x01.ndim == 2 else x01[0]
        im.to_dtype(im.resize_square(x01, SIZE), "uint8")  # [S, S]
    return n / (time.perf_counter() - t0)


def _shards_raw(shards: list[Path], n: int) -> float:
    t0, done = time.perf_counter(), 0
    while done < n:
        for shard in shards:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if m.name.endswith(".npy") and done < n:
                        np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
                        done += 1
    return n / (time.perf_counter() - t0)


def _shards_loader(out: Path, n: int, batch: int) -> float | None:
    try:
        from medssl.data.shards import make_loader
    except ImportError:
        return None
    it = iter(make_loader(str(out), img_size=SIZE, batch_size=batch, shuffle_buffer=16))
    next(it)  # warm-up
    t0 = time.perf_counter()
    for _ in range(max(1, n // batch)):
        next(it)
    return max(1, n // batch) * batch / (time.perf_counter() - t0)


def run(quick: bool = True) -> list[dict[str, Any]]:
    """Measure samples/s for the three paths; returns one row per path plus the speed-up row."""
    from data_tools import build_shards as bs

    n = 48 if quick else 400
    with tempfile.TemporaryDirectory() as tmp:
        paths = _sources(Path(tmp) / "dicom")
        out = Path(tmp) / "shards"
        cfg = bs.Config(size=SIZE, min_foreground=0.0, salt="bench")
        bs.build([{"name": "bench", "path": str(Path(tmp) / "dicom")}], out, cfg, progress=False)
        shards = sorted(out.glob("lumid-*.tar"))
        rows = [{"name": "dicom_on_the_fly", "samples_per_s": _on_the_fly(paths, n), "n": n},
                {"name": "shards_raw", "samples_per_s": _shards_raw(shards, n * 4), "n": n * 4}]
        loader = _shards_loader(out, n * 2, batch=16)
        if loader is not None:
            rows.append({"name": "shards_loader", "samples_per_s": loader, "n": n * 2})
    base = rows[0]["samples_per_s"]
    for row in rows:
        row.update(files=len(paths), img_size=SIZE, speedup_vs_dicom=row["samples_per_s"] / base)
    return rows


def resume_times(steps: tuple[int, ...] = (0, 100, 10_000), workers: int = 0, repeats: int = 3
                 ) -> list[dict[str, Any]]:
    """Seconds to the first batch when resuming at each of `steps` (median of `repeats`); one row per step.

    Shards: 40 x 100 synthetic 64 x 64 uint16 images, batch 32, shuffle blocks of 500 (125 batches an
    epoch, so step 10 000 is 80 epochs in).
    """
    from medssl.data.shard_writer import write_array_shards
    from medssl.data.shards import make_loader

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        write_array_shards((rng.integers(0, 65535, (64, 64), dtype=np.uint16) for _ in range(4000)), tmp, 100)
        for step in steps:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                next(iter(make_loader(tmp, 64, 32, num_workers=workers, shuffle_buffer=500, start_step=step)))
                times.append(time.perf_counter() - t0)
            rows.append({"name": "resume", "start_step": step, "workers": workers,
                         "first_batch_s": float(np.median(times)), "samples_before": step * 32})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resume", action="store_true", help="time to the first batch at a late start_step")
    args = parser.parse_args(argv)
    if args.resume:
        for workers in (0, 2):
            for row in resume_times(workers=workers):
                print(f"resume at step {row['start_step']:>6} ({row['samples_before']:>7} samples before, "
                      f"{workers} workers): first batch in {row['first_batch_s']:.3f} s")
        return 0
    for row in run(quick=args.quick):
        print(f"{row['name']:>18}: {row['samples_per_s']:9.1f} samples/s  "
              f"({row['speedup_vs_dicom']:.1f}x on-the-fly DICOM, n={row['n']}, {row['files']} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
