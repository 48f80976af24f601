"""Lesion detection on full-size DICOM mammograms: time and peak memory per image.

    python -m benchmarks.bench_predict [--checkpoint runs/medmask/teaching/best.pt] \
        [--json benchmarks/results/bench_predict.json]

Inputs (generated, nothing is downloaded): format-exact stand-ins of full-field digital mammograms, 16-bit
MONOCHROME2 MG objects with 12 bits stored, at two detector sizes (portrait 4096 x 3328, 13.6 MP, a Hologic
Selenia Dimensions 2-D image at 70 um; 5928 x 4728, 28.0 MP, a 24 x 30 cm detector at 50 um), each stored
uncompressed and in two compressed transfer syntaxes archives use (JPEG 2000 Lossless, RLE Lossless). The
pixels are a smooth breast-shaped phantom with textured tissue and noise (so that compression ratios are
realistic), and every file is decoded once and checked equal to the array it was made from.

The detector: `--checkpoint` (a MedMask stage checkpoint), else the reference-scale detector of
`recipes/configs/medmask_default.yaml` (Deformable DETR, ResNet-50, 800 px short side, at most 1333) with
untrained weights: time and memory do not depend on the weights' values.

Each image is predicted by `medssl.detection.predict.predict_files` in a fresh process, alone, so that its peak
resident memory (VmHWM) is its own. Beside each size, the same image stored uncompressed at exactly the detector's
input size reaches the same model input unresized: the difference of the two peaks is what the full-size file adds
(decode, full-resolution arrays, the overlay PNG at predict's default 2048 px; once, for the largest image, drawn
at its own size). `seconds` is predict's own per-image time (read, decode, resize, forward, NMS, overlay);
`decode_s` is `medssl.data.coco.read_image` alone, median of 3.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medssl.detection.predict import OVERLAY_MAX_SIDE

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((4096, 3328), (5928, 4728))  # (rows, columns), portrait as stored
SYNTAXES = ("ExplicitVRLittleEndian", "JPEG2000Lossless", "RLELossless")


def phantom(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A ``[rows, cols]`` uint16 (12 bits stored) breast-shaped phantom: chest wall on the left, a half-ellipse of
    textured tissue that falls off towards the skin line, air at 0 and a little noise everywhere."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    r = np.sqrt(((yy - rows / 2) / (0.45 * rows)) ** 2 + (xx / (0.8 * cols)) ** 2)
    small = ndimage.gaussian_filter(rng.standard_normal((rows // 16, cols // 16)).astype(np.float32), 3)
    texture = ndimage.zoom(small, (rows / small.shape[0], cols / small.shape[1]), order=1)[:rows, :cols]
    tissue = np.clip(1.0 - r, 0.0, 1.0) ** 0.3 * (2600 + 900 * texture / (np.abs(texture).max() + 1e-6))
    img = np.where(r < 1.0, tissue, 0.0) + rng.normal(0.0, 12.0, (rows, cols))
    return np.clip(img, 0, 4095).astype(np.uint16)


def write_mammogram(path: Path, pixels: np.ndarray, syntax: str) -> None:
    """An MG DICOM file of `pixels` (uint16, 12 bits stored) in the transfer syntax named `syntax` (a
    `pydicom.uid` name)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    uid = getattr(pydicom.uid, syntax)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.DigitalMammographyXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.Modality, ds.PatientID, ds.ViewPosition, ds.ImageLaterality = "MG", "STANDIN", "CC", "L"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    if uid == pydicom.uid.ExplicitVRLittleEndian:
        ds.PixelData = pixels.tobytes()
    else:
        ds.compress(uid, pixels)
    ds.save_as(path, enforce_file_format=True)


def _predict_one(checkpoint: str, image: str, out: str, overlay_max_side: int | None, queue: Any) -> None:
    """Child process: predict one image; report predict's seconds and this process's peak RSS."""
    from benchmarks.speed import peak_rss_mb
    from medssl.detection.predict import predict_files

    (res,) = predict_files(checkpoint, [image], out, overlay_max_side=overlay_max_side)
    queue.put({"seconds": res["seconds"], "peak_mb": peak_rss_mb()})


def measure(checkpoint: str, image: Path, out: Path, repeats: int = 2,
            overlay_max_side: int | None = OVERLAY_MAX_SIDE, timeout: float = 900.0) -> dict[str, Any]:
    """Predict `image` in `repeats` fresh spawned processes: the median of predict's seconds, the largest peak
    resident MiB (what a user must provision) and every run's peak."""
    ctx = mp.get_context("spawn")
    runs = []
    for _ in range(repeats):
        queue = ctx.Queue()
        proc = ctx.Process(target=_predict_one, args=(checkpoint, str(image), str(out), overlay_max_side, queue))
        proc.start()
        proc.join(timeout)  # the child's one small message fits the pipe: joining first cannot deadlock
        if proc.is_alive():
            proc.kill()
            raise TimeoutError(f"predict on {image} took over {timeout:.0f} s")
        if proc.exitcode:
            raise RuntimeError(f"predict on {image} failed (exit {proc.exitcode})")
        runs.append(queue.get(timeout=60))
    return {"seconds": statistics.median(r["seconds"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs),
            "peaks_mb": [round(r["peak_mb"]) for r in runs]}


def model_input(data: dict[str, Any], rows: int, cols: int) -> tuple[int, int]:
    """(H, W) a detector with the data config `data` (a stage checkpoint's ``data``) resizes a `rows` x `cols`
    image to."""
    import torch

    from medssl.detection.config import DEFAULTS
    from medssl.detection.data import transforms

    img, _ = transforms({"data": {**DEFAULTS["data"], **data}}, "none")(
        torch.zeros(1, rows, cols), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
    return int(img.shape[-2]), int(img.shape[-1])


def reference_detector(folder: Path) -> Path:
    """The reference-scale detector of `recipes/configs/medmask_default.yaml`, untrained, as a stage checkpoint."""
    from dataclasses import asdict

    import torch

    from medssl.config import load_config
    from medssl.detection.config import DEFAULTS, detr_config
    from medssl.detection.detr import build_detector
    from medssl.train.checkpoint import save_checkpoint

    cfg = load_config(DEFAULTS, ROOT / "recipes" / "configs" / "medmask_default.yaml", [])
    torch.manual_seed(0)
    model = build_detector(detr_config(cfg))
    path = folder / "reference_untrained.pt"
    save_checkpoint(path, {"model": model.state_dict(), "detector": asdict(model.cfg), "data": dict(cfg["data"])})
    return path


def run(checkpoint: str | None, sizes: tuple[tuple[int, int], ...] = SIZES,
        syntaxes: tuple[str, ...] = SYNTAXES, repeats: int = 2) -> dict[str, Any]:
    """Write the stand-ins, check each decodes to its array, predict each in its own process."""
    import pydicom
    from PIL import Image

    from medssl.data.coco import read_image
    from medssl.train.checkpoint import load_checkpoint

    rows_out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ckpt = checkpoint or str(reference_detector(tmp_path))
        data = load_checkpoint(ckpt).get("data", {})  # read once: the checkpoint holds every weight too
        for rows, cols in sizes:
            pixels = phantom(rows, cols)
            # the baseline: the same image at exactly the detector's input size, so that both reach the same model
            # input (whatever data.sizes / max_size say) and the difference is the full-size file's alone
            h, w = model_input(data, rows, cols)
            small = tmp_path / f"small_{rows}x{cols}.dcm"
            resized = Image.fromarray(pixels.astype(np.float32)).resize((w, h), Image.Resampling.BOX)
            write_mammogram(small, np.asarray(resized).round().astype(np.uint16), "ExplicitVRLittleEndian")
            if model_input(data, h, w) != (h, w):
                raise AssertionError(f"the baseline {h} x {w} does not reach the detector unresized")
            base = measure(ckpt, small, tmp_path / "out_small", repeats)
            for syntax in syntaxes:
                path = tmp_path / f"mg_{rows}x{cols}_{syntax}.dcm"
                t0 = time.perf_counter()
                write_mammogram(path, pixels, syntax)
                encode_s = time.perf_counter() - t0
                if not np.array_equal(pydicom.dcmread(path).pixel_array, pixels):
                    raise AssertionError(f"{path.name}: the decoded pixels differ from the array written")
                decode = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    read_image(path)
                    decode.append(time.perf_counter() - t0)
                # predict's default overlay; and, for the largest image's first syntax, the overlay drawn whole
                full = (rows, cols) == max(sizes) and syntax == syntaxes[0]
                for overlay in (OVERLAY_MAX_SIDE, None) if full else (OVERLAY_MAX_SIDE,):
                    got = measure(ckpt, path, tmp_path / f"out_{path.stem}", repeats, overlay)
                    rows_out.append({"rows": rows, "columns": cols, "megapixels": round(rows * cols / 1e6, 1),
                                     "syntax": syntax, "file_mb": round(path.stat().st_size / 2**20, 1),
                                     "overlay": f"{overlay} px" if overlay else "full size",
                                     "encode_s": round(encode_s, 2), "decode_s": round(statistics.median(decode), 3),
                                     "seconds": got["seconds"], "peak_mb": round(got["peak_mb"]),
                                     "peaks_mb": got["peaks_mb"], "small_peak_mb": round(base["peak_mb"]),
                                     "small_peaks_mb": base["peaks_mb"], "small_seconds": base["seconds"],
                                     "model_input": [h, w],
                                     "added_mb": round(got["peak_mb"] - base["peak_mb"])})
                    print(f"{rows} x {cols} {syntax}: {rows_out[-1]}", flush=True)
    return {"detector": checkpoint or "recipes/configs/medmask_default.yaml (untrained)", "rows": rows_out}


def report(result: dict[str, Any]) -> list[str]:
    """Markdown table: one line per file."""
    lines = [f"Detector: {result['detector']}; {result['machine']['cpus']} CPUs, torch threads "
             f"{result['threads']}.", "",
             "| image | transfer syntax | file MB | overlay | decode s | predict s per image | peak MB (each run) | "
             "peak MB, the same image at the detector's input size (each run) | added by the full-size file, MB |",
             "|---|---|---|---|---|---|---|---|---|"]

    def runs(r: dict[str, Any], key: str) -> str:
        each = r.get(f"{key}s_mb")
        return f"{r[f'{key}_mb']}" + (f" ({', '.join(map(str, each))})" if each and len(each) > 1 else "")

    for r in result["rows"]:
        lines.append(f"| {r['rows']} x {r['columns']} ({r['megapixels']} MP) | {r['syntax']} | {r['file_mb']} | "
                     f"{r['overlay']} | {r['decode_s']:.2f} | {r['seconds']:.2f} | {runs(r, 'peak')} | "
                     f"{runs(r, 'small_peak')} | {r['added_mb']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and write the JSON result file."""
    import torch

    from benchmarks.bench_build import machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a MedMask stage checkpoint (default: the reference-"
                        "scale detector of medmask_default.yaml, untrained)")
    parser.add_argument("--quick", action="store_true", help="one small size, one syntax (a smoke test)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per image (default 2)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_predict.json"))
    args = parser.parse_args(argv)
    sizes, syntaxes = (((512, 416),), SYNTAXES[2:]) if args.quick else (SIZES, SYNTAXES)
    result = {"machine": machine(), "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              **run(args.checkpoint, sizes, syntaxes, args.repeats)}
    result["load_avg_after"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print("\n".join(report(result)))
    print(f"written {args.json}; docs/medmask.md: python benchmarks/render_readme.py --section predict {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
