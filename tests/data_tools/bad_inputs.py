"""Generators of the bad inputs the shard builder must record and skip (used by the data_tools tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# kind -> substring of the one-line reason expected in the manifest, and the manifest status
EXPECTED = {
    "text_dcm": ("not a DICOM file", "failed"),
    "truncated": ("truncated pixel data", "failed"),
    "sr": ("not an image (SR object)", "skipped"),
    "rtstruct": ("not an image (RTSTRUCT object)", "skipped"),
    "no_pixels": ("no pixel data (CT; truncated file?)", "failed"),
    "codec": ("needs codec for MPEG2", "failed"),
    "constant": ("constant image", "skipped"),
    "zero_size": ("zero-sized image", "skipped"),
    "nan_nifti": ("NaN/inf voxels", "failed"),
    "bad_png": ("unreadable image file", "failed"),
}


def make_bad(folder: Path, kind: str) -> Path:
    """Write one bad input of `kind` (a key of EXPECTED) into `folder` and return its path."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    ct = get_testdata_file("CT_small.dcm")
    if kind == "text_dcm":
        path = folder / "notes.dcm"
        path.write_text("this is a text file that someone named .dcm\n" * 20)
    elif kind == "truncated":
        path = folder / "truncated.dcm"
        data = Path(ct).read_bytes()
        path.write_bytes(data[: len(data) - 5000])
    elif kind == "sr":
        path = folder / "report.dcm"
        path.write_bytes(Path(get_testdata_file("test-SR.dcm")).read_bytes())
    elif kind in ("rtstruct", "no_pixels"):
        ds = pydicom.dcmread(ct)
        del ds.PixelData
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        if kind == "rtstruct":
            ds.Modality = "RTSTRUCT"
            ds.SOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.481.3")  # RT Structure Set Storage
        path = folder / f"{kind}.dcm"
        ds.save_as(path)
    elif kind == "codec":
        from pydicom.encaps import encapsulate

        ds = pydicom.dcmread(ct)
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.840.10008.1.2.4.100")  # MPEG2
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        path = folder / "video.dcm"
        ds.save_as(path)
    elif kind in ("constant", "zero_size"):
        ds = pydicom.dcmread(ct)
        if kind == "constant":
            ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, np.int16).tobytes()
        else:
            ds.Rows = 0
            ds.PixelData = b""
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        path = folder / f"{kind}.dcm"
        ds.save_as(path)
    elif kind == "nan_nifti":
        import nibabel as nib

        data = np.random.default_rng(0).normal(size=(16, 16, 12)).astype(np.float32)
        data[3, 4, 5] = np.nan
        data[1, 1, 1] = np.inf
        path = folder / "nan.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    elif kind == "bad_png":
        path = folder / "broken.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    else:
        raise ValueError(f"unknown bad input kind {kind!r}")
    return path


def write_series(folder: Path, n: int, bad_rows: int | None = None) -> list[Path]:
    """A CT series of `n` slices of pydicom's real CT_small.dcm (pixels + 3k, z = 5k mm), files IM0000...;
    the last slice cut to `bad_rows` rows when given. Returns the files in slice order."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        arr = ds.pixel_array.astype(np.int16) + 3 * k
        if bad_rows is not None and k == n - 1:
            arr = arr[:bad_rows]
        ds.Rows = arr.shape[0]
        ds.PixelData = arr.tobytes()
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 5.0 * k], [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber, ds.SeriesInstanceUID = k + 1, series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"IM{k:04d}")  # no suffix, as archives often store them
    return [folder / f"IM{k:04d}" for k in range(n)]


def crash_on_marked_files(unit, cfg):  # noqa: ANN001 - mirrors shards_build.worker.process_unit
    """`process_unit`, except that the worker process dies (like a codec segfault) on files named crash*."""
    import os

    from data_tools.shards_build.worker import process_unit

    if any(os.path.basename(p).startswith("crash") for p in unit.paths):
        os._exit(139)
    return process_unit(unit, cfg)


def part_killed_once(index, argv, parts, *, victim, log):  # noqa: ANN001 - mirrors shards_build.on_dask.run_part
    """`run_part`, recording each attempt in the file `log`; the first attempt of part `victim` kills its own
    worker process mid-shard (like the OOM killer), after 20 samples were written."""
    import os

    from data_tools.shards_build.on_dask import run_part
    from medssl.data.shard_writer import ShardWriter

    with open(log, "a") as fh:
        fh.write(f"{index}\n")
    first = sum(line.strip() == str(index) for line in open(log)) == 1
    if index == victim and first:
        real_write, calls = ShardWriter.write, {"n": 0}

        def dying_write(self, key, image, meta):  # noqa: ANN001
            calls["n"] += 1
            if calls["n"] == 20:
                os._exit(137)
            return real_write(self, key, image, meta)

        ShardWriter.write = dying_write
    return run_part(index, argv, parts)
