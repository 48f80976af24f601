"""One bad file never loses a series: series of real CT slices (pydicom's CT_small.dcm) with a truncated
slice, a non-DICOM file, a missing slice and copies of a slice, built with `build_shards`; every
count, key and manifest line is checked against what the files make by construction."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from bad_inputs import write_series  # noqa: E402

from data_tools import build_shards as bs  # noqa: E402
from data_tools.shards_build.series import _runs, read_series  # noqa: E402
from medssl.data.shard_writer import finished_shards  # noqa: E402

SALT = "k"
ARGS = ["--size", "32", "--workers", "0", "--samples-per-shard", "16", "--axes", "0,1", "--every", "4",
        "--min-foreground", "0", "--min-volume-slices", "4", "--source-name", "ct", "--salt", SALT, "--no-progress"]


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def all_samples(out: Path) -> dict[str, tuple[bytes, bytes]]:
    samples = {}
    for shard in finished_shards(out):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        samples.update({n[:-4]: (members[n], members[n[:-4] + ".json"]) for n in members if n.endswith(".npy")})
    return samples


def truncate(path: Path) -> None:
    """A partial download: the same file (header and SOPInstanceUID intact) cut 5000 bytes short."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])


def sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_runs_split_at_gaps_and_uneven_spacing():
    assert _runs([45.0, 40.0, 35.0, 30.0]) == ([[0, 1, 2, 3]], 5.0)
    assert _runs([45.0, 40.0, 30.0, 25.0, 20.0]) == ([[0, 1], [2, 3, 4]], 5.0)  # one slice missing
    assert _runs([10.0, 8.0, 6.0, 5.0, 4.0, 3.0]) == ([[0], [1], [2, 3, 4, 5]], 1.0)  # 2 mm, then 1 mm
    assert _runs([5.0, 5.0, 4.0, 3.0, 2.0]) == ([[0], [1, 2, 3, 4]], 1.0)  # two different slices at one position
    assert _runs([7.0]) == ([[0]], None)


def test_truncated_slice_non_dicom_file_and_missing_slice(tmp_path):
    files = write_series(tmp_path / "ct", 16)
    files[9].unlink()  # a slice never downloaded
    truncate(files[12])  # a partial download
    (tmp_path / "ct" / "IM9999").write_text("an HTML error page saved under a slice's name\n" * 20)
    out = tmp_path / "out"
    assert bs.main([str(tmp_path / "ct"), "--out", str(out), *ARGS]) == 0
    recs = {r["unit"]: r for r in manifest(out)}
    series = next(r for r in recs.values() if r["kind"] == "series")
    # readable slices, head to feet: 15 14 13 | gap (12 unreadable) | 11 10 | gap (9 missing) | 8 .. 0
    runs = [[15, 14, 13], [11, 10], [8, 7, 6, 5, 4, 3, 2, 1, 0]]
    assert series["status"] == "written" and series["input"] == [str(files[k]) for run in runs for k in run]
    assert series["split"] == ("gaps or uneven spacing between slices (spacing 5.0 mm): split into 3 contiguous "
                               "sub-volumes of 3+2+9 slices, 2 too short to reslice")
    assert series["volumes"] == [{"slices": len(r), "spacing": 5.0, "first": str(files[r[0]])} for r in runs]
    bad = recs[f"slice:{files[12]}"]
    assert (bad["status"], bad["reason"], bad["part_of"]) == ("failed", "truncated pixel data", series["unit"])
    other = next(r for r in recs.values() if r["input"] == str(tmp_path / "ct" / "IM9999"))
    assert (other["status"], other["reason"]) == ("failed", "not a DICOM file")
    assert len(recs) == 3  # the series, its truncated slice, the stray file: every input file once
    # samples: runs of 3 and 2 slices (< 4) give their first plane only (every 4th of 3 or 2); the 9-slice
    # run is resliced: axis 0 planes 0, 4, 8 and axis 1 every 4th of 128 rows -> 32 planes
    base = f"ct_{bs.hash_id(SALT, series['unit'])}"
    expected = {f"{base}_v0f0000", f"{base}_v1f0000", *(f"{base}_v2a0s{i:04d}" for i in (0, 4, 8)),
                *(f"{base}_v2a1s{i:04d}" for i in range(0, 128, 4))}
    expected = {f"{k}_wide" for k in expected}
    samples = all_samples(out)
    assert set(series["keys"]) == set(samples) == expected and series["n_samples"] == 37
    # each plane comes from the right slice file (instance = salted SOPInstanceUID), spacing never resampled
    for key, slice_index in [("v0f0000", 15), ("v1f0000", 11), ("v2a0s0000", 8), ("v2a0s0004", 4),
                             ("v2a0s0008", 0)]:
        meta = json.loads(samples[f"{base}_{key}_wide"][1])
        assert meta["instance"] == bs.hash_id(SALT, sop(files[slice_index])) and meta["spacing"][0] == 5.0
    meta = json.loads(samples[f"{base}_v2a1s0000_wide"][1])
    assert meta["plane_shape"] == [68, 128] and meta["orig_shape"] == [9, 128, 128]  # 9 x 5 mm / 0.661 mm
    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"] == {"written": 1, "failed": 2} and stats["samples"] == 37


@pytest.mark.parametrize("copy", ["A_partial", "Z_partial", "Z_full"])
def test_copy_with_the_same_uid_in_either_order(tmp_path, copy):
    """A truncated copy of slice 4 (same SOPInstanceUID) sorting before or after it, or a full copy:
    the readable complete slice is kept, the copy recorded, and the shards equal those of the clean series."""
    files = write_series(tmp_path / "clean" / "ct", 10)
    clean = tmp_path / "clean_out"
    assert bs.main([str(tmp_path / "clean" / "ct"), "--out", str(clean), *ARGS]) == 0
    shutil.copytree(tmp_path / "clean" / "ct", tmp_path / "dirty" / "ct")
    dup = tmp_path / "dirty" / "ct" / copy
    shutil.copy(files[4], dup)
    if copy.endswith("partial"):
        truncate(dup)
    out = tmp_path / "out"
    assert bs.main([str(tmp_path / "dirty" / "ct"), "--out", str(out), *ARGS]) == 0
    recs = manifest(out)
    series = next(r for r in recs if r["kind"] == "series")
    kept = tmp_path / "dirty" / "ct" / files[4].name
    assert series["status"] == "written" and len(series["input"]) == 10 and str(kept) in series["input"]
    assert "split" not in series and series["n_samples"] == 3 + 32
    (rec,) = [r for r in recs if r["kind"] == "dicom"]
    assert (rec["input"], rec["status"], rec["duplicate_of"]) == (str(dup), "duplicate", str(kept))
    unreadable = "; this copy is unreadable: truncated pixel data" if copy.endswith("partial") else ""
    assert rec["reason"] == "same SOPInstanceUID as a slice kept in the series" + unreadable
    assert all_samples(out) == all_samples(clean)  # same keys, same bytes


def test_same_pixels_at_the_same_position_is_a_copy(tmp_path):
    files = write_series(tmp_path / "ct", 5)
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # re-exported copy: new UID, same image
    ds.save_as(tmp_path / "ct" / "IM0002_export")
    parts = read_series([str(p) for p in sorted((tmp_path / "ct").iterdir())])
    assert parts.split is None and len(parts.volumes) == 1 and parts.volumes[0].pixels.shape == (5, 128, 128)
    assert parts.left_out == [{"input": str(tmp_path / "ct" / "IM0002_export"), "status": "duplicate",
                               "reason": "same pixels at the same position as a slice kept in the series",
                               "duplicate_of": str(files[2])}]
    ds0 = pydicom.dcmread(files[0])
    hu = np.stack([pydicom.dcmread(files[k]).pixel_array * float(ds0.RescaleSlope) + float(ds0.RescaleIntercept)
                   for k in (4, 3, 2, 1, 0)])  # [Z, H, W] head to feet
    np.testing.assert_allclose(parts.volumes[0].pixels, hu, rtol=0, atol=1e-3)
    assert parts.volumes[0].spacing[0] == 5.0
