"""The builder benchmark's DICOM slices are distinct images (nothing is dropped as a duplicate) and a timed
build counts every sample."""

from __future__ import annotations

import pytest

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")

from benchmarks import bench_build  # noqa: E402


def test_dicom_series_build_writes_every_slice(tmp_path):
    if pytest.importorskip("pydicom.data").get_testdata_file(bench_build.DICOM_SLICE) is None:
        pytest.skip("pydicom-data is not installed")
    bench_build.dicom_series(tmp_path / "dicom", series=2, slices=8)
    row = bench_build.time_build(tmp_path / "dicom", None, workers=1, tmp=tmp_path)
    assert (row["units"], row["samples"]) == (2, 16)  # two series, one sample per slice (axis 0, one window)
    assert row["cpu_s"] > 0 and row["wall_s"] > 0

