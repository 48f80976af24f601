"""Shard builder throughput: samples/s per worker on real DICOM series and NIfTI volumes, 1 vs 2 workers.

    python -m benchmarks.bench_build [--quick] [--rounds 3] [--json benchmarks/results/bench_build.json]

Inputs (nothing is downloaded):
- `dicom`: CT series made of pydicom-data's real 512 x 512 CT slice `693_UNCR.dcm` (slice k stored + k,
  so that no two slices are the same image; 5 mm apart), read slice by slice as the builder does;
- `nifti`: copies of nilearn's MNI152 T1 template (197 x 233 x 189, copy j + j so that the copies are
  distinct content), else nibabel's `anatomical.nii`.

Each build runs `data_tools.build_shards` with its default options (224 px, acquisition axis, CT
window wide) into a fresh folder, planning and stats included. Wall time and CPU time (this process
plus its workers, from getrusage) are measured; rounds interleave 1 and 2 workers so that a busy
machine slows both alike, and the median round is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DICOM_SLICE = "693_UNCR.dcm"
MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def dicom_series(folder: Path, series: int, slices: int) -> None:
    """`series` CT series of `slices` slices each, from one real CT slice (see the module docstring)."""
    import pydicom
    from pydicom.data import get_testdata_file

    src = get_testdata_file(DICOM_SLICE)
    if src is None:
        raise FileNotFoundError(f"{DICOM_SLICE} is not installed (pip install pydicom-data)")
    base = pydicom.dcmread(src)
    pixels = base.pixel_array  # [512, 512] uint16
    for s in range(series):
        series_uid = pydicom.uid.generate_uid()
        (folder / f"s{s}").mkdir(parents=True)
        for k in range(slices):
            ds = pydicom.dcmread(src)
            ds.PixelData = (pixels + k).astype(pixels.dtype).tobytes()
            ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 5.0 * k], [1, 0, 0, 0, 1, 0]
            ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, pydicom.uid.generate_uid(), k + 1
            ds.save_as(folder / f"s{s}" / f"IM{k:04d}")


def nifti_volumes(folder: Path, copies: int) -> str:
    """`copies` distinct copies of a real T1 volume; returns where the volume came from."""
    import nibabel as nib

    try:
        import nilearn.datasets

        src = Path(nilearn.datasets.__file__).parent / "data" / MNI_T1
    except ImportError:
        src = None
    if src is None or not src.is_file():
        from nibabel.testing import data_path

        src = Path(data_path) / "anatomical.nii"
    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    folder.mkdir(parents=True)
    for j in range(copies):
        nib.save(nib.Nifti1Image(data + j, img.affine), str(folder / f"t1_{j}.nii.gz"))
    return src.name


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its finished child processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_build(src: Path, modality: str | None, workers: int, tmp: Path) -> dict[str, Any]:
    """Build shards from `src` once with `workers` worker processes; samples, wall and CPU seconds."""
    from data_tools import build_shards as bs

    out = Path(tempfile.mkdtemp(dir=tmp))
    spec = {"name": src.name, "path": str(src), "modality": modality, "body_part": None}
    cpu0, t0 = _cpu_s(), time.perf_counter()
    summary = bs.build([spec], out, bs.Config(salt="bench"), workers=workers, progress=False)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    return {"samples": summary["stats"]["samples"], "units": summary["units"], "wall_s": wall, "cpu_s": cpu}


def run(quick: bool = False, rounds: int = 3) -> list[dict[str, Any]]:
    """One row per (input, workers): median round's samples/s, per worker, per CPU second."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        series, slices, copies = (2, 16, 2) if quick else (4, 40, 4)
        dicom_series(tmp / "dicom", series=series, slices=slices)
        source = nifti_volumes(tmp / "nifti", copies=copies)
        t1 = "the MNI152 T1 (197 x 233 x 189)" if source == MNI_T1 else f"`{source}`"
        inputs = {"dicom": (tmp / "dicom", None, f"{DICOM_SLICE} series",
                            f"DICOM: {series} CT series x {slices} slices of the real 512 x 512 `{DICOM_SLICE}`"),
                  "nifti": (tmp / "nifti", "MR", source, f"NIfTI: {copies} copies of {t1}, axial")}
        for name, (src, modality, what, label) in inputs.items():
            runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
            for r in range(rounds):
                for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                    runs[workers].append(time_build(src, modality, workers, tmp))
            for workers, results in runs.items():
                best = sorted(results, key=lambda x: x["wall_s"])[(len(results) - 1) // 2]  # median (lower) round
                sps = best["samples"] / best["wall_s"]
                rows.append({"input": name, "source": what, "what": label, "workers": workers, **best,
                             "rounds_wall_s": [round(x["wall_s"], 2) for x in results],
                             "samples_per_s": sps, "samples_per_s_per_worker": sps / workers,
                             "samples_per_cpu_s": best["samples"] / best["cpu_s"]})
            one, two = (next(r for r in rows if r["input"] == name and r["workers"] == w) for w in (1, 2))
            two["speedup_vs_1_worker"] = two["samples_per_s"] / one["samples_per_s"]
    return rows


def report(result: dict[str, Any]) -> list[str]:
    """The markdown table of a result file: per input and worker count, samples, wall and CPU seconds, rates."""
    lines = ["| input | workers | samples | wall s | CPU s | samples/s (wall) | samples per CPU second |",
             "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in result["rows"]:
        what = r.get("what", f"{r['input']} ({r.get('source', '')})")
        lines.append(f"|{' ' if what in seen else f' {what} '}| {r['workers']} | {r['samples']} | {r['wall_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r['samples_per_s']:.1f} | {r['samples_per_cpu_s']:.1f} |")
        seen.add(what)
    return lines


def machine() -> dict[str, Any]:
    """Date, machine, versions and commit of a measurement."""
    import nibabel
    import pydicom

    try:
        flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512_bf16",
                                                                                       "amx_bf16")})
    except OSError:
        flags = []
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_flags": flags, "load_avg": os.getloadavg(), "commit": commit,
            "python": platform.python_version(), "numpy": np.__version__, "pydicom": pydicom.__version__,
            "nibabel": nibabel.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and write the JSON result file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer slices and volumes (a smoke test)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per worker count (default 3)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_build.json"))
    args = parser.parse_args(argv)
    before = machine()
    rows = run(args.quick, args.rounds)
    result = {"machine": before, "load_avg_after": os.getloadavg(), "quick": args.quick, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"# shard builder, {before['cpus']} CPUs, load average {before['load_avg'][0]:.1f} at the start")
    print("\n".join(report(result)))
    print("2 vs 1 worker, wall: " + ", ".join(f"{r['input']} {r['speedup_vs_1_worker']:.2f}x" for r in rows
                                              if "speedup_vs_1_worker" in r))
    print(f"written {args.json}; docs/speed.md: python benchmarks/render_readme.py --section build {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
