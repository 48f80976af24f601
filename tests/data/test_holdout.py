"""Pools are checked against test images by content: bytes, decoded pixels, SOP instance and series UIDs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medssl.data.holdout import (
    PoolOverlapError,
    check_disjoint,
    content_keys,
    held_out_sources,
    keys_of,
    read_pool_keys,
    write_pool_record,
)


def _ct(path: Path, add: int, sop: str, series: str) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = (ds.pixel_array.astype(np.int16) + add).tobytes()
    ds.SOPInstanceUID, ds.SeriesInstanceUID = sop, series
    ds.save_as(path)
    return path


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 30), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "test.png")
    Image.fromarray(img).save(tmp_path / "same_pixels.tif")  # other bytes, same image
    Image.fromarray(255 - img).save(tmp_path / "other.png")
    shutil.copy(tmp_path / "test.png", tmp_path / "copy.png")
    series = pydicom.uid.generate_uid()
    sop = pydicom.uid.generate_uid()
    _ct(tmp_path / "test_ct.dcm", 0, sop, series)
    _ct(tmp_path / "lossy_copy.dcm", 3, sop, pydicom.uid.generate_uid())  # same instance, other pixels
    _ct(tmp_path / "next_slice.dcm", 7, pydicom.uid.generate_uid(), series)  # another slice of the test series
    _ct(tmp_path / "unrelated_ct.dcm", 11, pydicom.uid.generate_uid(), pydicom.uid.generate_uid())
    return tmp_path


def test_keys_find_every_kind_of_copy(files):
    test = keys_of([files / "test.png", files / "test_ct.dcm"])
    pool = [{"path": str(files / n)} for n in ("copy.png", "same_pixels.tif", "other.png", "lossy_copy.dcm",
                                               "next_slice.dcm", "unrelated_ct.dcm")]
    kept, dropped = held_out_sources(pool, test)
    assert sorted(Path(s["path"]).name for s in kept) == ["other.png", "unrelated_ct.dcm"]
    why = {Path(p).name: r for p, r in dropped.items()}
    assert why["copy.png"].startswith("test image: shares file with") and why["copy.png"].endswith("test.png")
    assert why["same_pixels.tif"].startswith("test image: shares pixels with")
    assert why["lossy_copy.dcm"].startswith("test image: shares instance with")
    assert why["next_slice.dcm"].startswith("test image: shares series with")
    assert content_keys(files / "test.png") == content_keys(files / "copy.png")
    (files / "broken.dcm").write_bytes(b"not an image")  # identified by its bytes only
    assert [k.split(":")[0] for k in content_keys(files / "broken.dcm")] == ["file"]


def test_pool_record_and_check(files, tmp_path):
    test = keys_of([files / "test_ct.dcm"])
    clean = [{"path": str(files / "other.png"), "source": "a"},
             {"path": str(files / "unrelated_ct.dcm"), "source": "b"}]
    pool = write_pool_record(tmp_path / "pool", clean, {"x": "held out"})
    assert json.loads(pool.read_text())["held_out"] == {"x": "held out"}
    check_disjoint(read_pool_keys(tmp_path / "pool"), test, "ok")  # nothing shared: no error
    write_pool_record(tmp_path / "leaky", clean + [{"path": str(files / "lossy_copy.dcm"), "source": "c"}])
    with pytest.raises(PoolOverlapError, match=r"task t: the pretraining pool holds 1 test image file\(s\): .*"
                                               r"lossy_copy.dcm \(instance of test file .*test_ct.dcm\)"):
        check_disjoint(read_pool_keys(tmp_path / "leaky"), test, "task t")
    with pytest.raises(FileNotFoundError, match="no pool record"):
        read_pool_keys(tmp_path / "nothing")


def test_demo_pool_leaves_out_test_files(files, tmp_path):
    """The LUMID-mini builder's source list without the files a task tests on, each with its reason."""
    from data_tools.demo_lumid import pool_sources

    kept, dropped = pool_sources([{"name": "dir", "path": str(files), "modality": None, "body_part": None}],
                                 {"taskA": [str(files / "test.png")]})
    names = sorted(Path(s["path"]).name for s in kept)
    assert "test.png" not in names and "copy.png" not in names and "same_pixels.tif" not in names
    assert "other.png" in names and "next_slice.dcm" in names
    assert dropped[str(files / "same_pixels.tif")] == (f"test image: shares pixels with {files / 'test.png'} "
                                                       "(test file of taskA)")


def test_run_all_refuses_a_pool_with_a_test_image(files, tmp_path):
    from benchmarks.cells import Backbone
    from benchmarks.run_all import check_pools
    from benchmarks.tasks import TaskData

    task = TaskData("t", "classification", "-", 2, ["a", "b"], {}, test_files=[str(files / "test.png")])
    write_pool_record(tmp_path / "leaky", [{"path": str(files / "same_pixels.tif")}])
    write_pool_record(tmp_path / "clean", [{"path": str(files / "other.png")}])
    check_pools(task, [Backbone("vit", "x", "MAE", "-", "ViT", pool=str(tmp_path / "clean")),
                       Backbone("vit_random", "{}", "none", "-", "ViT")])
    with pytest.raises(PoolOverlapError, match="same_pixels.tif"):
        check_pools(task, [Backbone("vit", "x", "MAE", "-", "ViT", pool=str(tmp_path / "leaky"))])
    with pytest.raises(ValueError, match="no pretraining pool recorded"):
        check_pools(task, [Backbone("vit", "x", "MAE", "-", "ViT")])
    with pytest.raises(ValueError, match="declares no test files"):
        check_pools(TaskData("u", "classification", "-", 2, ["a", "b"], {}),
                    [Backbone("vit", "x", "MAE", "-", "ViT", pool=str(tmp_path / "clean"))])
