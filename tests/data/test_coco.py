"""COCO detection dataset, registry, transforms and collate against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.data import coco as C


def _write(tmp_path, split="train", anns=True):
    """DATA_ROOT/toy with two images: 40x60 16-bit with two boxes, 30x20 8-bit normal."""
    root = tmp_path / "toy"
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    a = np.zeros((40, 60), np.uint16)
    a[5:15, 10:30] = 65535  # the first box, bright
    a[0, 0] = 32768
    Image.fromarray(a).save(root / "images" / split / "a.png")
    b = np.full((30, 20), 51, np.uint8)
    Image.fromarray(b).save(root / "images" / split / "b.png")
    coco = {"images": [{"id": 7, "file_name": "a.png", "height": 40, "width": 60},
                       {"id": 3, "file_name": "b.png", "height": 30, "width": 20}],
            "categories": [{"id": 9, "name": "calc"}, {"id": 4, "name": "mass"}]}
    if anns:
        coco["annotations"] = [{"id": 1, "image_id": 7, "category_id": 4, "bbox": [10, 5, 20, 10]},
                               {"id": 2, "image_id": 7, "category_id": 9, "bbox": [0, 20, 6, 20]}]
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def test_read_image_bit_depths(tmp_path):
    root = _write(tmp_path)
    a = C.read_image(root / "images/train/a.png")
    assert a.dtype == np.float32 and a.shape == (40, 60)
    assert a[6, 11] == 1.0 and a[0, 0] == pytest.approx(32768 / 65535) and a[30, 30] == 0.0
    assert C.read_image(root / "images/train/b.png")[0, 0] == pytest.approx(0.2)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        C.read_image(root / "nope.png")


def test_sample_targets_by_hand(tmp_path):
    root = _write(tmp_path)
    ds = C.CocoDetection(root / "annotations/instances_train.json", root / "images/train",
                         C.make_transforms("none", max_size=60, mean=(0.0,), std=(1.0,)))
    assert len(ds) == 2 and [c["id"] for c in ds.categories] == [4, 9]
    img, t = ds[1]  # images are sorted by id: 3 (b.png), 7 (a.png)
    assert img.shape == (1, 40, 60) and float(img[0, 6, 11]) == 1.0
    # xywh [10, 5, 20, 10] in a 60 x 40 image -> cx 20/60, cy 10/40, w 20/60, h 10/40; category 4 -> label 0
    torch.testing.assert_close(t["boxes"], torch.tensor([[20 / 60, 10 / 40, 20 / 60, 10 / 40],
                                                          [3 / 60, 30 / 40, 6 / 60, 20 / 40]]))
    assert t["labels"].tolist() == [0, 1] and int(t["image_id"]) == 7
    assert t["orig_size"].tolist() == [40, 60] and t["size"].tolist() == [40, 60]
    np.testing.assert_allclose(ds.gt_boxes_xyxy(1), [[10, 5, 30, 15], [0, 20, 6, 40]])
    img, t = ds[0]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert ds.file_of(0).name == "b.png"


def test_subset_keeps_its_images_and_their_boxes_only(tmp_path):
    root = _write(tmp_path)
    ds = C.CocoDetection(root / "annotations/instances_train.json", root / "images/train")
    sub = ds.subset([1])  # image id 7 (a.png) with its two boxes
    assert len(sub) == 1 and sub.file_of(0).name == "a.png" and len(ds) == 2  # the original is untouched
    np.testing.assert_allclose(sub.gt_boxes_xyxy(0), [[10, 5, 30, 15], [0, 20, 6, 40]])
    assert [im["id"] for im in sub.coco["images"]] == [7] and len(sub.coco["annotations"]) == 2
    assert int(sub[0][1]["image_id"]) == 7
    normal = ds.subset([0])
    assert normal.gt_boxes_xyxy(0).shape == (0, 4) and normal.coco["annotations"] == []
    with pytest.raises(ValueError, match="subset indices"):
        ds.subset([2])


def test_flip_resize_and_channels(tmp_path):
    root = _write(tmp_path)
    tf = C.make_transforms("weak", max_size=30, sizes=[20], flip_p=1.0, in_chans=3, mean=(0.0,), std=(1.0,))
    ds = C.CocoDetection(root / "annotations/instances_train.json", root / "images/train", tf)
    img, t = ds[1]
    assert img.shape == (3, 20, 30)  # shorter side 20 (scale 0.5), longer side 30 <= max_size
    assert t["size"].tolist() == [20, 30] and t["orig_size"].tolist() == [40, 60]
    # flipped: x1' = 60 - 30 = 30, x2' = 60 - 10 = 50 -> cx = 40 / 60; y unchanged
    torch.testing.assert_close(t["boxes"][0], torch.tensor([40 / 60, 10 / 40, 20 / 60, 10 / 40]))
    torch.testing.assert_close(t["boxes"][1], torch.tensor([57 / 60, 30 / 40, 6 / 60, 20 / 40]))
    # the bright block moved to the right half: columns 15..25 of 30 after flip + halving
    assert float(img[0, 3:7, 16:24].mean()) > 0.95 and float(img[0, 3:7, 4:14].mean()) < 0.05


def test_default_size_keeps_small_and_shrinks_large():
    img = torch.rand(1, 40, 60)
    t = {"boxes": torch.tensor([[6.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([0])}
    out, tt = C.make_transforms("none", max_size=100)(img, t)
    assert out.shape == (1, 40, 60) and tt["size"].tolist() == [40, 60]  # no upscaling by default
    out, tt = C.make_transforms("weak", max_size=30, flip_p=0.0)(img, t)
    assert out.shape == (1, 20, 30)  # longer side 60 -> 30
    torch.testing.assert_close(tt["boxes"], torch.tensor([[18 / 60, 12 / 40, 24 / 60, 16 / 40]]))
    out, _ = C.make_transforms("none", max_size=200, sizes=80)(img, t)
    assert out.shape == (1, 80, 120)  # an explicit shorter side upscales


def test_weak_strong_share_geometry():
    torch.manual_seed(0)
    img = torch.rand(1, 32, 48)
    target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 12.0]]), "labels": torch.tensor([0]),
              "image_id": torch.tensor(1), "orig_size": torch.tensor([32, 48])}
    same = C.make_transforms("weak_strong", max_size=48, sizes=[32], brightness=0, contrast=0, gamma=0,
                             blur_p=0, erase_p=0)
    (w, s), _ = same(img, target)
    torch.testing.assert_close(w, s)
    tf = C.make_transforms("weak_strong", max_size=48, sizes=[16, 24, 32], erase_p=1.0)
    for _ in range(5):
        (w, s), t = tf(img, target)
        assert w.shape == s.shape and not torch.equal(w, s)
        assert t["size"].tolist() == list(w.shape[-2:])
    with pytest.raises(ValueError, match="kind"):
        C.make_transforms("medium")


def test_collate_pads_and_masks():
    a = (torch.ones(1, 4, 6), {"boxes": torch.zeros(0, 4)})
    b = (torch.full((1, 5, 3), 2.0), {"boxes": torch.zeros(1, 4)})
    images, mask, targets = C.collate_detection([a, b], pad_to_multiple=4)
    assert images.shape == (2, 1, 8, 8) and mask.shape == (2, 8, 8)
    assert int((~mask[0]).sum()) == 24 and int((~mask[1]).sum()) == 15
    assert float(images[0].sum()) == 24 and float(images[1].sum()) == 30 and len(targets) == 2
    (w, s), mask, _ = C.collate_detection([((a[0], a[0] * 3), {}), ((b[0], b[0]), {})])
    assert w.shape == s.shape == (2, 1, 5, 6) and float(s[0].sum()) == 72


def test_registry_yaml_and_missing_dataset_message(tmp_path):
    root = _write(tmp_path, split="train")
    (root / "unl").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "unl" / "x.png")
    reg = tmp_path / "reg.yaml"
    reg.write_text("datasets:\n  toy:\n    train: {ann: annotations/instances_train.json, images: images/train}\n"
                   "    target: {images: unl}\n")
    assert C.load_registry(reg) == ["toy"]
    assert len(C.build_dataset("toy", "train", tmp_path)) == 2
    unl = C.build_dataset("toy", "target", tmp_path)
    assert isinstance(unl, C.UnlabelledImages) and unl[0][1]["boxes"].shape == (0, 4)
    with pytest.raises(C.DatasetNotFoundError) as e:
        C.dataset_paths("ddsm", "train", tmp_path / "nowhere")
    msg = str(e.value)
    assert "nowhere/ddsm/annotations/instances_train.json" in msg and "images/train" in msg
    assert "python recipes/medmask_detect.py --dataset demo" in msg
    assert "rsna-bsd1k" not in msg and C.registered_datasets()["rsna-bsd1k"]["train"].ann.endswith("full.json")
    with pytest.raises(ValueError, match="unknown dataset"):
        C.dataset_paths("nope", "train", tmp_path)
    with pytest.raises(ValueError, match="already registered"):
        C.register_dataset("toy", {"train": {"images": "x"}})


def test_unlabelled_coco_and_bad_files(tmp_path):
    root = _write(tmp_path, split="target", anns=False)
    ds = C.CocoDetection(root / "annotations/instances_target.json", root / "images/target")
    assert all(ds[i][1]["boxes"].shape == (0, 4) for i in range(len(ds)))
    bad = json.loads((root / "annotations/instances_target.json").read_text())
    bad["images"][0]["height"] = 99
    (root / "annotations/bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="differs from the COCO entry"):
        C.CocoDetection(root / "annotations/bad.json", root / "images/target")[1]
    bad["annotations"] = [{"id": 1, "image_id": 3, "category_id": 5, "bbox": [0, 0, 1, 1]}]
    (root / "annotations/bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown category 5"):
        C.CocoDetection(root / "annotations/bad.json", root / "images/target")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        C.CocoDetection(root / "annotations/missing.json", root / "images/target")


def test_dicom_goes_through_imaging():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small.dcm")
    a = C.read_image(path)
    raw = pydicom.dcmread(path).pixel_array
    assert a.shape == raw.shape and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.05
