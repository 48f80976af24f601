"""Readers and intensity normalisation on real files shipped by pydicom, pydicom-data and nibabel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.data import get_testdata_file  # noqa: E402

from medssl.data import imaging as im  # noqa: E402


def _ct_series(tmp_path: Path, zs: list[float], numbers: list[int], rows: list[int] | None = None) -> list[Path]:
    """Slices made from CT_small with the given positions / instance numbers (slice k adds k HU)."""
    paths = []
    for k, (z, n) in enumerate(zip(zs, numbers)):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        arr = ds.pixel_array.astype(np.int16) + k
        if rows is not None and rows[k] != arr.shape[0]:
            arr = arr[: rows[k]]
        ds.Rows = arr.shape[0]
        ds.PixelData = arr.tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = n
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        path = tmp_path / f"slice{k}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_ct_small_modality_lut_gives_hounsfield_units():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    img = im.read_dicom(get_testdata_file("CT_small.dcm"))
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(img.pixels, expected)
    assert img.modality == "CT"
    assert np.percentile(img.pixels, 1) < -800  # air
    soft = img.pixels[(img.pixels > -200) & (img.pixels < 200)]
    counts, edges = np.histogram(soft, bins=40, range=(-200, 200))
    assert -20 <= edges[counts.argmax()] <= 100  # soft tissue peak
    assert img.spacing == pytest.approx((0.661468, 0.661468))


def test_window_maps_bounds_to_zero_and_max():
    w = im.Window.from_level_width("soft", 40, 400)
    assert (w.low, w.high) == (-160.0, 240.0)
    x = np.array([-160.0, 240.0, 40.0, -1000.0, 3000.0], np.float32)
    np.testing.assert_allclose(im.apply_window(x, w), [0.0, 1.0, 0.5, 0.0, 1.0])
    assert im.to_dtype(im.apply_window(x, w), "uint8").tolist() == [0, 255, 128, 0, 255]
    assert im.to_dtype(im.apply_window(x, w), "uint16").tolist() == [0, 65535, 32768, 0, 65535]
    with pytest.raises(ValueError, match="low < high"):
        im.Window("bad", 10, 10)


def test_ct_uses_fixed_window_never_min_max():
    img = im.read_dicom(get_testdata_file("CT_small.dcm"))
    with pytest.raises(ValueError, match="HU window"):
        im.normalise(img)
    out, rec = im.normalise(img, im.Window("wide", -1000, 1000))
    hand = np.clip((img.pixels + 1000.0) / 2000.0, 0, 1)
    np.testing.assert_allclose(out, hand, atol=1e-6)
    assert rec["kind"] == "hu" and out.min() > 0.04  # the image minimum (-896 HU) is NOT stretched to 0


def test_monochrome1_xray_is_inverted_with_bright_bone():
    path = get_testdata_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64)
    out, rec = im.normalise(im.read_dicom(path))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and rec["inverted"] and rec["kind"] == "voi"
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2  # DICOM linear VOI function
    np.testing.assert_allclose(out, 1.0 - np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-5)
    # in MONOCHROME1 the smallest stored values are the brightest (bone): they must come out bright
    assert out[raw <= np.percentile(raw, 2)].mean() > 0.9
    assert out[raw >= np.percentile(raw, 98)].mean() < 0.3
    assert np.corrcoef(raw.ravel()[::97], out.ravel()[::97])[0, 1] < -0.99


def test_jpeg2000_lossless_decodes_like_uncompressed():
    a = im.read_dicom(get_testdata_file("RG3_J2KR.dcm")).pixels
    b = im.read_dicom(get_testdata_file("RG3_UNCR.dcm")).pixels
    np.testing.assert_array_equal(a, b)


def test_rgb_ultrasound_to_grey():
    path = get_testdata_file("US1_UNCR.dcm")
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float64)
    img = im.read_dicom(path)
    np.testing.assert_allclose(img.pixels, rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114,
                               atol=1e-3)
    assert img.pixels.ndim == 2 and img.modality == "US"


def test_multiframe_gives_frames():
    img = im.read_dicom(get_testdata_file("emri_small.dcm"))
    assert img.pixels.shape == (10, 64, 64) and not img.is_volume


def test_enhanced_ct_rescale_from_functional_groups_and_frame_order(tmp_path):
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    assert "RescaleIntercept" not in ds  # only in the shared functional group
    hu = ds.pixel_array * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)  # [2, 512, 512]
    img = im.read_dicom(path)
    assert img.is_volume and img.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    # normal = row x col = (-1,0,0) x (0,1,0) = (0,0,-1): z -159 (frame 0) before z -149 (frame 1)
    np.testing.assert_array_equal(img.pixels, hu)
    assert img.pixels.min() == -1024
    frames = ds.PerFrameFunctionalGroupsSequence
    p0 = frames[0].PlanePositionSequence[0].ImagePositionPatient
    frames[0].PlanePositionSequence[0].ImagePositionPatient = frames[1].PlanePositionSequence[0].ImagePositionPatient
    frames[1].PlanePositionSequence[0].ImagePositionPatient = p0
    ds.save_as(tmp_path / "swapped.dcm")
    np.testing.assert_array_equal(im.read_dicom(tmp_path / "swapped.dcm").pixels, hu[::-1])


def test_mr_percentile_clip_of_nonzero_voxels_keeps_background():
    from nibabel.testing import data_path

    path = Path(data_path) / "anatomical.nii"
    raw = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
    out, rec = im.normalise(im.read_nifti(path, "MR"))
    nz = raw[raw != 0]
    lo, hi = np.percentile(nz, 0.5), np.percentile(nz, 99.5)
    expected = np.where(raw == 0, 0.0, np.clip((raw - lo) / (hi - lo), 0, 1))
    assert rec["kind"] == "percentile_nonzero" and rec["low"] == pytest.approx(lo)
    # the reader reorients, so compare the multisets of values
    np.testing.assert_allclose(np.sort(out.ravel()), np.sort(expected.ravel()), atol=1e-6)
    assert (out == 0).sum() == (raw == 0).sum() + ((raw != 0) & (raw <= lo)).sum()


def test_nifti_orientation_superior_anterior_right_first(tmp_path):
    data = np.zeros((6, 7, 8), np.float32)
    data[5, 6, 7] = 1.0  # RAS+: far right, anterior, superior corner
    data[0, 0, 0] = 0.5
    path = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0])), str(path))
    img = im.read_nifti(path)
    assert img.pixels.shape == (8, 7, 6) and img.spacing == (3.0, 2.0, 1.0)
    assert img.pixels[0, 0, 0] == 1.0 and img.pixels[-1, -1, -1] == 0.5
    assert img.is_volume and img.modality == "MR"


def test_series_ordered_by_position_then_instance_number(tmp_path):
    zs, numbers = [10.0, 30.0, 20.0, 0.0], [4, 1, 3, 2]
    paths = _ct_series(tmp_path, zs, numbers)
    vol = im.read_dicom_series(paths)
    assert vol.is_volume and vol.pixels.shape == (4, 128, 128)
    # descending z (head first): z 30 (k=1), 20 (k=2), 10 (k=0), 0 (k=3); slice k was offset by k HU
    base = im.read_dicom(get_testdata_file("CT_small.dcm")).pixels
    offsets = [float(np.median(vol.pixels[i] - base)) for i in range(4)]
    assert offsets == [1.0, 2.0, 0.0, 3.0]
    assert vol.spacing[0] == pytest.approx(10.0)
    for p in paths:  # without positions: InstanceNumber order
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p)
    vol = im.read_dicom_series(paths)
    offsets = [float(np.median(vol.pixels[i] - base)) for i in range(4)]
    assert offsets == [1.0, 3.0, 2.0, 0.0]  # InstanceNumber 1, 2, 3, 4 -> k = 1, 3, 2, 0


def test_series_with_inconsistent_sizes_is_rejected(tmp_path):
    paths = _ct_series(tmp_path, [0.0, 1.0, 2.0], [1, 2, 3], rows=[128, 128, 100])
    with pytest.raises(im.UnreadableImage, match="inconsistent slice sizes in series"):
        im.read_dicom_series(paths)


def test_iter_slices_respects_spacing_step_and_empty_planes():
    vol = np.zeros((4, 10, 6), np.float32)
    vol[1:3, 2:8, 1:5] = 1.0
    planes = list(im.iter_slices(vol, (3.0, 1.0, 1.0), axis=1))
    assert [s.index for s in planes] == list(range(2, 8))  # constant (empty) planes skipped
    assert planes[0].pixels.shape == (12, 6) and planes[0].spacing == 1.0  # 4 slices x 3 mm -> 12 px
    assert [s.index for s in im.iter_slices(vol, (3.0, 1.0, 1.0), axis=0, step=2)] == [2]
    assert len(list(im.iter_slices(vol, None, axis=2, min_foreground=0.5))) == 0
    assert list(im.iter_slices(vol, None, axis=2))[0].pixels.shape == (4, 10)
    with pytest.raises(ValueError, match="axis"):
        next(im.iter_slices(vol, None, axis=3))


def test_resize_square_keeps_aspect():
    img = np.zeros((50, 100), np.float32)
    img[:, 40:60] = 1.0  # a centred vertical bar, 20% of the width
    crop = im.resize_square(img, 32, "crop")  # 50x100 -> 32x64 -> centre 32 columns
    assert crop.shape == (32, 32)
    assert crop[:, 16].min() > 0.99 and crop[:, 0].max() < 0.01
    pad = im.resize_square(img, 32, "pad")  # 50x100 -> 16x32, padded rows
    assert pad.shape == (32, 32) and pad[:8].max() == 0 and pad[-8:].max() == 0
    assert pad[16, 16] > 0.99


def test_raster_8_and_16_bit(tmp_path):
    from PIL import Image

    a16 = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 3) % 4000
    Image.fromarray(a16).save(tmp_path / "x16.png")
    img = im.read_raster(tmp_path / "x16.png")
    np.testing.assert_array_equal(img.pixels, a16.astype(np.float32))
    assert img.bits == 16
    out, rec = im.normalise(img)
    assert rec["kind"] == "percentile" and out.min() == 0 and out.max() == 1
    Image.fromarray(a16).save(tmp_path / "x16.tif")
    np.testing.assert_array_equal(im.read_raster(tmp_path / "x16.tif").pixels, a16.astype(np.float32))
    Image.frombytes("I;16B", (48, 64), a16.astype(">u2").tobytes()).save(tmp_path / "x16be.tif")
    big_endian = im.read_raster(tmp_path / "x16be.tif")
    np.testing.assert_array_equal(big_endian.pixels, a16.astype(np.float32))
    assert big_endian.bits == 16
    a8 = np.tile(np.arange(256, dtype=np.uint8), (10, 1))
    Image.fromarray(a8).save(tmp_path / "x8.png")
    out, rec = im.normalise(im.read_raster(tmp_path / "x8.png"))
    np.testing.assert_allclose(out, a8 / 255.0, atol=1e-6)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200
    rgb[:4, :, 0] = 100
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    grey = im.read_raster(tmp_path / "rgb.png").pixels
    np.testing.assert_allclose(grey[4:], 200 * 0.587, atol=1e-3)
    np.testing.assert_allclose(grey[:4], 200 * 0.587 + 100 * 0.299, atol=1e-3)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.dcm"):
        im.read_image(tmp_path / "nope.dcm")
