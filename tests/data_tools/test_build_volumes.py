"""build_shards --dims 3: a DICOM series and a NIfTI volume of known geometry become whole resampled volumes
(shape, spacing, orientation and values checked by hand), gaps split the series, resume, and the crop loader."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.data import get_testdata_file  # noqa: E402

from data_tools import build_shards as bs  # noqa: E402
from medssl.data import imaging as im  # noqa: E402
from medssl.data.shard_writer import finished_shards, read_sample, shard_keys  # noqa: E402
from medssl.data.shards import make_loader  # noqa: E402

ARGS = ["--dims", "3", "--workers", "0", "--no-progress", "--salt", "s3cret", "--min-size", "8",
        "--samples-per-shard", "2"]
DZ, ROW_SP, COL_SP = 2.0, 0.8, 0.6  # mm: slice gap, pixel spacing (rows, columns)


def write_ramp_series(folder: Path, n: int = 10, skip: tuple[int, ...] = (),
                      orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0)) -> None:
    """A CT series of 32 x 40 slices whose HU value is 10 x the slice's position along the normal (mm) plus the
    column index, so the resampled volume is a known linear ramp; slices in `skip` are not written (a gap)."""
    folder.mkdir(parents=True)
    series = pydicom.uid.generate_uid()
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    for k in range(n):
        if k in skip:
            continue
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.Rows, ds.Columns = 32, 40
        ds.RescaleSlope, ds.RescaleIntercept = 1, -100
        hu = 20 * k + np.broadcast_to(np.arange(40), (32, 40))
        ds.PixelData = (hu + 100).astype(np.int16).tobytes()
        ds.PixelSpacing = [ROW_SP, COL_SP]
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = (normal * DZ * k).tolist()
        ds.InstanceNumber, ds.SeriesInstanceUID = k + 1, series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"IM{k:04d}")


def samples_of(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    return {k: read_sample(shard, k) for shard in finished_shards(out) for k in shard_keys(shard)}


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_series_and_nifti_become_resampled_volumes(tmp_path):
    write_ramp_series(tmp_path / "src" / "series")
    data = np.random.default_rng(0).uniform(10, 100, (20, 16, 10)).astype(np.float32)  # [X, Y, Z]
    affine = np.diag([0.9, 1.1, 3.0, 1.0])  # RAS, so canonical already
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "src" / "mr.nii.gz")
    out = tmp_path / "out"
    assert bs.main([str(tmp_path / "src"), "--out", str(out), "--spacing", "1.2", "--modality", "MR",
                    "--ct-windows", "wide=-1000:1000,bone=0:400", *ARGS]) == 0
    got = samples_of(out)
    assert len(got) == 3  # two CT windows of the series, one MR volume
    assert json.loads((out / "build_config.json").read_text())["dims"] == 3

    # series: 10 slices 2 mm apart, 32 x 40 px of 0.8 x 0.6 mm -> floor(20/1.2), floor(25.6/1.2), floor(24/1.2)
    (bone_key,) = [k for k in got if k.endswith("_bone")]
    vol, meta = got[bone_key]
    assert vol.shape == (16, 21, 20) and meta["shape"] == [16, 21, 20] and vol.dtype == np.uint8
    assert meta["spacing"] == [1.2, 1.2, 1.2] and meta["source_spacing"] == [DZ, ROW_SP, COL_SP]
    assert meta["orientation"] == "IPL" and meta["direction"] == [[0, 0, -1], [0, 1, 0], [1, 0, 0]]
    assert meta["orig_shape"] == [10, 32, 40] and meta["window"]["name"] == "bone" and meta["dims"] == 3
    # slices stacked head to feet: HU 180 + column at index 0 ... 0 + column at index 9; output voxel i lies
    # (i + .5) 1.2 mm from the first slice's outer edge, i.e. at slice coordinate (i + .5) * 0.6 - .5; output
    # column 10 lies at input column (10 + .5) * 2 - .5 = 20.5
    z = np.clip((np.arange(16) + 0.5) * 1.2 / DZ - 0.5, 0, 9)
    hu = 180 - 20 * z + 20.5
    expected = np.rint(np.clip(hu / 400, 0, 1) * 255)
    assert np.abs(vol[:, 10, 10].astype(float) - expected).max() <= 1

    # NIfTI: [Z, Y, X] = [10, 16, 20] at (3.0, 1.1, 0.9) mm -> floor(30/1.2), floor(17.6/1.2), floor(18/1.2)
    (mr_key,) = [k for k, (_, m) in got.items() if m["modality"] == "MR"]
    vol, meta = got[mr_key]
    assert vol.shape == (25, 14, 15) and meta["source_spacing"] == [3.0, 1.1, 0.9]
    assert meta["orientation"] == "IPL" and meta["window"]["kind"] == "percentile_nonzero"
    img = im.read_nifti(tmp_path / "src" / "mr.nii.gz", "MR")
    x01, _ = im.normalise(img)  # the 2-D code path's normalisation, then the resampling
    assert np.array_equal(vol, im.to_dtype(im.resample_volume(x01, img.spacing, (1.2,) * 3)))
    # the 2-D build of the same sources still works and records no 3-D options
    out2 = tmp_path / "out2"
    assert bs.main([str(tmp_path / "src"), "--out", str(out2), "--size", "16", *ARGS[2:]]) == 0
    assert "dims" not in json.loads((out2 / "build_config.json").read_text())
    assert all(a.ndim == 2 for a, _ in samples_of(out2).values())


def test_geometry_helpers_by_hand():
    # coronal slices: rows along -z (feet), columns along +x (left); normal = row x col = +y, stacked descending
    assert im.series_direction([1, 0, 0, 0, 0, -1]) == [[0, -1, 0], [0, 0, -1], [1, 0, 0]]
    assert im.orientation_code(im.series_direction([1, 0, 0, 0, 0, -1])) == "AIL"
    ramp = np.broadcast_to(np.arange(7, dtype=np.float32)[:, None, None] * 3.0, (7, 4, 5))  # value = z in mm
    out = im.resample_volume(ramp, (3.0, 1.0, 1.0), (2.0, 1.0, 1.0))
    assert out.shape == (10, 4, 5)  # floor(7 * 3 / 2)
    inside = (np.arange(10) + 0.5) * 2.0 - 1.5  # mm from the first voxel's centre
    ok = (inside >= 0) & (inside <= 18)
    np.testing.assert_allclose(out[ok, 1, 1], inside[ok], atol=1e-4)
    with pytest.raises(ValueError, match="thinner than one"):
        im.resample_volume(np.zeros((1, 4, 4), np.float32), (1.0, 1.0, 1.0), (2.0, 1.0, 1.0))


def test_gap_splits_the_series_and_2d_images_are_refused(tmp_path):
    write_ramp_series(tmp_path / "src" / "gap", n=14, skip=(5,))  # 8 + 5 slices (head to feet) around a gap
    pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(tmp_path / "src" / "single.dcm")
    out = tmp_path / "out"
    bs.main([str(tmp_path / "src"), "--out", str(out), "--spacing", "2", "--min-volume-slices", "6", *ARGS])
    records = {r["kind"]: r for r in manifest(out)}
    series = records["series"]
    assert series["status"] == "written" and "split into 2 contiguous sub-volumes of 8+5" in series["split"]
    assert "< --min-volume-slices 6" in series["volumes"][1]["refused"] and "refused" not in series["volumes"][0]
    assert len(series["keys"]) == 1 and "_v0vol_" in series["keys"][0]  # never resampled across the gap
    vol, meta = samples_of(out)[series["keys"][0]]
    assert meta["orig_shape"] == [8, 32, 40] and vol.shape[0] == 8  # 8 slices x 2 mm
    assert records["dicom"]["status"] == "skipped" and "2-D image: --dims 3" in records["dicom"]["reason"]


def test_resumed_build_and_other_options_refused(tmp_path):
    write_ramp_series(tmp_path / "src" / "a")
    write_ramp_series(tmp_path / "src" / "b", n=9)
    once, twice = tmp_path / "once", tmp_path / "twice"
    bs.main([str(tmp_path / "src"), "--out", str(once), *ARGS])
    bs.main([str(tmp_path / "src"), "--out", str(twice), "--max-units", "1", *ARGS])
    assert len(samples_of(twice)) == 1  # the first series (one CT window), then the run stopped
    bs.main([str(tmp_path / "src"), "--out", str(twice), *ARGS])
    a, b = samples_of(once), samples_of(twice)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k][0], b[k][0]) for k in a)
    with pytest.raises(SystemExit):  # another spacing into the same folder is refused
        bs.main([str(tmp_path / "src"), "--out", str(twice), "--spacing", "2", *ARGS])


@pytest.fixture()
def volume_shards(tmp_path):
    from medssl.data.shard_writer import write_array_shards

    rng = np.random.default_rng(3)
    vols = [rng.integers(0, 255, (20 + i % 3, 24, 18 + i), dtype=np.uint8) for i in range(12)]
    write_array_shards(vols, tmp_path, samples_per_shard=4)
    return tmp_path


def test_crop_stream_resumes_exactly_and_pads(volume_shards, caplog):
    kw = dict(dims=3, shuffle_buffer=5, mean=(0.5,), std=(0.25,))
    straight = list(itertools.islice(iter(make_loader(volume_shards, 16, 3, **kw)), 7))
    assert straight[0].shape == (3, 1, 16, 16, 16)
    resumed = list(itertools.islice(iter(make_loader(volume_shards, 16, 3, start_step=4, **kw)), 3))
    assert all(torch.equal(a, b) for a, b in zip(straight[4:], resumed))
    ranks = [next(iter(make_loader(volume_shards, 16, 3, rank=r, world_size=2, **kw))) for r in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])
    loader = make_loader(volume_shards, 16, 2, crop_size=(24, 16, 16), **kw)  # depth 20..22 < 24: padded
    batch = next(iter(loader))
    assert batch.shape == (2, 1, 24, 16, 16) and loader.dataset.padded == 2
    assert (batch[:, :, 0] == -2.0).all()  # zero padding, normalised: (0 - 0.5) / 0.25
    assert "smaller than the (24, 16, 16) crop: zero-padded" in caplog.text
    with pytest.raises(ValueError, match="expected a 3-D volume"):
        from medssl.data.shard_writer import encode_npy
        from medssl.data.shards import decode_npy

        decode_npy(encode_npy(np.zeros((4, 4), np.uint8)), dims=3)


def test_parts_and_merge_equal_one_whole_volume_build(tmp_path):
    for i, n in enumerate((9, 10, 11)):
        write_ramp_series(tmp_path / "src" / f"s{i}", n=n)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert bs.main([str(tmp_path / "src"), "--out", str(whole), *ARGS]) == 0
    for i in range(2):
        assert bs.main([str(tmp_path / "src"), "--out", str(split), "--part", f"{i}/2", *ARGS]) == 0
    assert bs.main(["merge", str(split)]) == 0
    a, b = samples_of(whole), samples_of(split)
    assert sorted(a) == sorted(b) and len(a) == 3 and all(np.array_equal(a[k][0], b[k][0]) for k in a)
    assert next(iter(make_loader(split, 8, 3, dims=3))).shape == (3, 1, 8, 8, 8)


def test_enhanced_multiframe_with_a_gap_is_split(tmp_path):
    import copy

    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))  # 2 frames of 512 x 512, 10 mm apart
    frame = ds.pixel_array[0]
    zs = [-159.0 + 10 * k for k in (0, 1, 2, 4, 5, 6, 7)]  # no frame at z = -129: a gap
    template = ds.PerFrameFunctionalGroupsSequence[0]
    items = []
    for z in zs:
        item = copy.deepcopy(template)
        pos = item.PlanePositionSequence[0].ImagePositionPatient
        item.PlanePositionSequence[0].ImagePositionPatient = [pos[0], pos[1], z]
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(items)
    ds.NumberOfFrames = len(zs)
    ds.PixelData = np.stack([frame + 10 * k for k in range(len(zs))]).astype(frame.dtype).tobytes()
    (tmp_path / "src").mkdir()
    ds.save_as(tmp_path / "src" / "enhanced.dcm")
    img = im.read_dicom(tmp_path / "src" / "enhanced.dcm")
    # normal = row x col = (-1, 0, 0) x (0, 1, 0) = (0, 0, -1): position -z, stacked descending (z ascending)
    assert img.is_volume and img.positions == [159.0, 149.0, 139.0, 119.0, 109.0, 99.0, 89.0]
    assert im.orientation_code(img.direction) == "SPR"
    out = tmp_path / "out"
    bs.main([str(tmp_path / "src"), "--out", str(out), "--spacing", "5", "--min-volume-slices", "3", *ARGS])
    (rec,) = manifest(out)
    assert rec["status"] == "written" and "split into 2 contiguous sub-volumes of 3+4 frames" in rec["split"]
    shapes = sorted(a.shape[0] for a, _ in samples_of(out).values())
    assert shapes == [6, 8] and [v["slices"] for v in rec["volumes"]] == [3, 4]  # 3 x 10 mm and 4 x 10 mm at 5 mm
