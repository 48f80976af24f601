"""Transfer data sets: folder / CSV classification, PNG and NIfTI segmentation pairs, group splits."""

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.data.datasets import (
    ClassificationDataset,
    SegmentationDataset,
    classification_records,
    split_by_group,
)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_folder_tree_classification(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", rng.integers(0, 255, (20, 30)))
    recs, classes = classification_records(tmp_path)
    assert classes == ["benign", "malignant"] and len(recs) == 6
    ds = ClassificationDataset(recs, img_size=16, in_chans=3)
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y.item() == 1
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_csv_classification_and_patient_split(tmp_path):
    rows = ["path,label,patient"]
    for p in range(6):
        for s in range(3):
            _png(tmp_path / "img" / f"p{p}_{s}.png", np.full((8, 8), 40 * s))
            rows.append(f"img/p{p}_{s}.png,{p % 2},P{p}")
    (tmp_path / "t.csv").write_text("\n".join(rows))
    recs, classes = classification_records(tmp_path / "t.csv")
    assert classes == ["0", "1"]
    splits = split_by_group([r.group for r in recs], (0.5, 0.25, 0.25), seed=3)
    per_group = {}
    for r, s in zip(recs, splits):
        per_group.setdefault(r.group, set()).add(s)
    assert all(len(v) == 1 for v in per_group.values())  # no patient straddles splits
    assert set(splits) == {"train", "val", "test"}


def test_split_by_group_shares_and_errors():
    groups = [f"g{i // 4}" for i in range(400)]  # 100 groups of 4
    s = np.array(split_by_group(groups, (0.7, 0.15, 0.15), seed=0))
    assert abs((s == "train").mean() - 0.7) < 0.03 and abs((s == "test").mean() - 0.15) < 0.03
    assert split_by_group(groups, (1, 0, 0)) == ["train"] * 400
    with pytest.raises(ValueError, match="groups"):
        split_by_group(["a", "a"], (0.5, 0.25, 0.25))
    with pytest.raises(ValueError, match="fractions"):
        split_by_group(["a"], (1, -1, 0))


def test_csv_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("file,label\nx.png,1\n")
    with pytest.raises(ValueError, match="missing column"):
        classification_records(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("path,label\nnope.png,1\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        classification_records(tmp_path / "gone.csv")
    with pytest.raises(FileNotFoundError):
        classification_records(tmp_path / "missing.csv")


def test_png_segmentation_pairs_stay_aligned(tmp_path):
    img = np.zeros((40, 20), np.uint8)
    img[10:30, 5:15] = 200
    mask = np.zeros((40, 20), np.uint8)
    mask[10:30, 5:15] = 255  # binary 0/255 mask -> classes 0/1
    _png(tmp_path / "a.png", img)
    _png(tmp_path / "a_mask.png", mask)
    (tmp_path / "s.csv").write_text("image,mask\na.png,a_mask.png\n")
    ds = SegmentationDataset.from_csv(tmp_path / "s.csv", img_size=32, num_classes=2)
    x, m = ds[0]
    assert x.shape == (1, 32, 32) and m.shape == (32, 32) and m.dtype == torch.int64
    assert set(m.unique().tolist()) == {0, 1}
    bright = x[0] > 0.5
    agree = (bright == (m == 1)).float().mean().item()
    assert agree > 0.97


def test_nifti_volume_pairs_split_by_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    rows = ["image,mask"]
    for v in range(3):
        vol = np.zeros((16, 16, 10), np.float32)
        lab = np.zeros((16, 16, 10), np.int16)
        vol[4:12, 4:12, 2:8] = 100 + v
        vol += np.random.default_rng(v).random(vol.shape).astype(np.float32)
        lab[4:12, 4:12, 2:8] = 1
        lab[6:10, 6:10, 3:7] = 2
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / f"v{v}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / f"v{v}_seg.nii.gz")
        rows.append(f"v{v}.nii.gz,v{v}_seg.nii.gz")
    (tmp_path / "s.csv").write_text("\n".join(rows))
    ds = SegmentationDataset.from_csv(tmp_path / "s.csv", img_size=16, num_classes=3, axis=0,
                                      min_foreground=0.1)
    assert len(ds) == 3 * 6  # only the planes with the cube in them
    assert set(ds.masks.unique().tolist()) == {0, 1, 2}
    for i in range(len(ds)):
        x, m = ds[i]
        assert ((x[0] > 0.5) == (m > 0)).float().mean() > 0.95
    splits = split_by_group(ds.groups, (1, 1, 1))
    assert len({(g, s) for g, s in zip(ds.groups, splits)}) == 3
    sub = ds.subset([0, 1])
    assert len(sub) == 2 and sub.groups == ds.groups[:2]


def test_mask_out_of_range(tmp_path):
    _png(tmp_path / "a.png", np.arange(64).reshape(8, 8))
    _png(tmp_path / "m.png", np.full((8, 8), 7))
    (tmp_path / "s.csv").write_text("image,mask\na.png,m.png\n")
    with pytest.raises(ValueError, match="class indices"):
        SegmentationDataset.from_csv(tmp_path / "s.csv", img_size=8, num_classes=3)
