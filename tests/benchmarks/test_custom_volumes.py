"""The no-code 3-D task: `image,mask[,patient]` NIfTI pairs in YAML, split by patient, crops and tiles."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from benchmarks.tasks import build_task


def _pairs(tmp, n: int = 4, label: int = 1) -> str:
    lines = ["image,mask,patient"]
    for i in range(n):
        vol = np.full((12, 10, 6), 100.0 * (i + 1), np.float32)  # 2 x 2 x 4 mm, RAS
        seg = np.zeros(vol.shape, np.uint8)
        seg[3:6, 2:5, 1:3] = label
        affine = np.diag([2.0, 2.0, 4.0, 1.0])
        nib.save(nib.Nifti1Image(vol, affine), str(tmp / f"v{i}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(tmp / f"m{i}.nii.gz"))
        lines.append(f"v{i}.nii.gz,m{i}.nii.gz,p{min(i, 2)}")  # v2 and v3: one patient
    (tmp / "pairs.csv").write_text("\n".join(lines) + "\n")
    return str(tmp / "pairs.csv")


def test_volume_pairs_become_a_3d_task_split_by_patient(tmp_path):
    spec = {"name": "mine", "kind": "segmentation", "dims": 3, "csv": _pairs(tmp_path), "num_classes": 2,
            "spacing": 2.0, "window": [0, 1000], "train_crops": 3}
    task = build_task(spec, 8)
    assert task.spatial_dims == 3 and task.summary()["spatial_dims"] == 3
    for patients in task.groups.values():
        assert patients and len(set(patients)) == 1  # three patients, one per split
    for split, (x, y) in task.splits.items():
        per = 3 if split == "train" else 8  # 12 x 10 x 12 voxels at 2 mm: tiles of 8^3 -> 2 x 2 x 2
        assert x.shape[1:] == (1, 8, 8, 8) and y.shape[1:] == (8, 8, 8) and x.shape[0] % per == 0
    volumes = len(task.groups["test"]) // 8  # 8 tiles per test volume
    assert int(task.splits["test"][1].sum()) == volumes * 3 * 3 * 2 * 2  # each label voxel once (z: 4 -> 2 mm)
    test_patient = task.groups["test"][0]
    want = {"p0": ["v0"], "p1": ["v1"], "p2": ["v2", "v3"]}[test_patient]
    assert task.test_files == [str(tmp_path / f"{v}.nii.gz") for v in want]
    assert float(task.splits["train"][0].max()) <= 1.0
    with pytest.raises(ValueError, match="outside 0..1"):
        build_task({**spec, "csv": _pairs(tmp_path, label=2)}, 8)
    with pytest.raises(ValueError, match="dims: 3 takes kind segmentation"):
        build_task({**spec, "kind": "classification"}, 8)
