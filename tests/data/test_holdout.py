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
    pool_inputs,
    read_pool_keys,
    write_pool_record,
)


def _pool(folder: Path, files: list[Path], held_out: dict | None = None) -> Path:
    """A shard folder whose manifest says these files were written, and its pool record."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"input": str(f), "status": "written"} for f in files] + [{"input": "x.dcm", "status": "failed"}]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_pool_record(folder, held_out)


def _ct(path: Path, add: int, sop: str, series: str, study: str = "1.2.3.4", patient: str = "P1") -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = (ds.pixel_array.astype(np.int16) + add).tobytes()
    ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID = sop, series, study, patient
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
    _ct(tmp_path / "unrelated_ct.dcm", 11, pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), "9.8.7", "P2")
    _ct(tmp_path / "prior_study.dcm", 13, pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), "5.5.5", "P1")
    ds = pydicom.dcmread(tmp_path / "unrelated_ct.dcm")
    ds.SOPInstanceUID, ds.PixelData = sop, b"\0" * 10  # the test instance, pixels that do not decode
    ds.save_as(tmp_path / "undecodable_copy.dcm")
    return tmp_path


def test_keys_find_every_kind_of_copy(files):
    test = keys_of([files / "test.png", files / "test_ct.dcm"])
    pool = [{"path": str(files / n)} for n in ("copy.png", "same_pixels.tif", "other.png", "lossy_copy.dcm",
                                               "next_slice.dcm", "unrelated_ct.dcm", "undecodable_copy.dcm",
                                               "prior_study.dcm")]
    kept, dropped = held_out_sources(pool, test)
    assert sorted(Path(s["path"]).name for s in kept) == ["other.png", "unrelated_ct.dcm"]
    why = {Path(p).name: r for p, r in dropped.items()}
    assert why["copy.png"].startswith("test image: shares file with") and why["copy.png"].endswith("test.png")
    assert why["same_pixels.tif"].startswith("test image: shares pixels with")
    assert why["lossy_copy.dcm"].startswith("test image: shares instance with")
    assert why["next_slice.dcm"].startswith("test image: shares series with")
    assert why["undecodable_copy.dcm"].startswith("test image: shares instance with")  # read from its header
    assert why["prior_study.dcm"].startswith("test image: shares patient with")  # another study of the patient
    assert not any(k.startswith("pixels:") for k in content_keys(files / "undecodable_copy.dcm"))
    assert content_keys(files / "test.png") == content_keys(files / "copy.png")
    (files / "broken.dcm").write_bytes(b"not an image")  # identified by its bytes only
    assert [k.split(":")[0] for k in content_keys(files / "broken.dcm")] == ["file"]


def test_pool_record_and_check(files, tmp_path):
    test = keys_of([files / "test_ct.dcm"])
    record = _pool(tmp_path / "pool", [files / "other.png", files / "unrelated_ct.dcm"], {"x": "held out"})
    assert json.loads(record.read_text())["held_out"] == {"x": "held out"}
    assert pool_inputs(tmp_path / "pool") == sorted([str(files / "other.png"), str(files / "unrelated_ct.dcm")])
    check_disjoint(read_pool_keys(tmp_path / "pool"), test, "ok")  # nothing shared: no error
    _pool(tmp_path / "leaky", [files / "other.png", files / "lossy_copy.dcm"])
    with pytest.raises(PoolOverlapError, match=r"task t: the pretraining pool holds 1 test image file\(s\): .*"
                                               r"lossy_copy.dcm \(instance of test file .*test_ct.dcm\)"):
        check_disjoint(read_pool_keys(tmp_path / "leaky"), test, "task t")
    with pytest.raises(FileNotFoundError, match="no pool record"):
        read_pool_keys(tmp_path / "nothing")
    old = json.loads(record.read_text())
    (tmp_path / "pool" / "pool.json").write_text(json.dumps({**old, "version": 1}))  # keys of another making
    with pytest.raises(ValueError, match="version 1, not 2"):
        read_pool_keys(tmp_path / "pool")


def test_build_records_what_the_folder_holds_not_what_it_was_given(files, tmp_path):
    """A rebuild into a used folder keeps its earlier shards: pool.json lists them, so the check still sees them."""
    from data_tools.build_shards import main

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(files / "test.png", tmp_path / "a" / "leak.png")
    shutil.copy(files / "other.png", tmp_path / "b" / "clean.png")
    out = tmp_path / "shards"
    common = ["--out", str(out), "--size", "16", "--min-size", "8", "--workers", "0", "--no-progress"]
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), *common]) == 0
    assert main([str(tmp_path / "b"), *common]) == 0  # the same folder, now without the test image
    with pytest.raises(PoolOverlapError, match="leak.png"):
        check_disjoint(read_pool_keys(out), keys_of([files / "test.png"]), "rebuilt pool")


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
    _pool(tmp_path / "leaky", [files / "same_pixels.tif"])
    _pool(tmp_path / "clean", [files / "other.png"])
    check_pools(task, [Backbone("vit", "x", "MAE", "-", "ViT", pool=str(tmp_path / "clean")),
                       Backbone("vit_random", "{}", "none", "-", "ViT")])
    with pytest.raises(PoolOverlapError, match="same_pixels.tif"):
        check_pools(task, [Backbone("vit", "x", "MAE", "-", "ViT", pool=str(tmp_path / "leaky"))])
    from medssl.data.holdout import file_sha256

    bb = tmp_path / "bb"  # a backbone whose provenance names its pool and the pool record it saw
    bb.mkdir()
    record = file_sha256(tmp_path / "clean" / "pool.json")
    prov = {"data": str(tmp_path / "clean"), "pool_record": record}
    (bb / "config.json").write_text(json.dumps({"provenance": prov}))
    check_pools(task, [Backbone("vit", str(bb), "MAE", "-", "ViT", pool=str(tmp_path / "clean"))])
    _pool(tmp_path / "clean", [files / "other.png", files / "unrelated_ct.dcm"])  # rebuilt since: another pool
    with pytest.raises(ValueError, match="changed since it was pretrained"):
        check_pools(task, [Backbone("vit", str(bb), "MAE", "-", "ViT", pool=str(tmp_path / "clean"))])
    with pytest.raises(ValueError, match="no pretraining pool recorded"):
        check_pools(task, [Backbone("vit", "x", "MAE", "-", "ViT")])
    with pytest.raises(ValueError, match="declares no test files"):
        check_pools(TaskData("u", "classification", "-", 2, ["a", "b"], {}),
                    [Backbone("vit", "x", "MAE", "-", "ViT", pool=str(tmp_path / "clean"))])
