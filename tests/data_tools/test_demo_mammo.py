"""The synthetic mammography demo: layout, determinism, lesion boxes, expert embeddings."""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from data_tools import demo_mammo
from data_tools.coco_tools import validate


def _run(out, *extra):
    p = argparse.ArgumentParser()
    demo_mammo.add_arguments(p)
    args = p.parse_args(["--out", str(out), "--height", "128", "--width", "96", "--train", "8", "--val", "4",
                         "--test", "2", "--target", "3", "--abnormal-frac", "0.5", "--expert", "none", *extra])
    assert args.func is demo_mammo.run
    return args.func(args)


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != "_info.json":
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_demo_layout_and_determinism(tmp_path):
    assert _run(tmp_path / "a") == 0 and _run(tmp_path / "b") == 0
    root = tmp_path / "a" / "demo"
    assert _digest(root) == _digest(tmp_path / "b" / "demo")
    assert _run(tmp_path / "c", "--seed", "1") == 0
    assert _digest(tmp_path / "c" / "demo") != _digest(root)
    report = validate(root)
    assert report.ok, report.errors
    counts = {s: report.summary[f"instances_{s}.json"]["images"] for s in ("train", "val", "test", "target")}
    assert counts == {"train": 8, "val": 4, "test": 2, "target": 3}
    assert report.summary["instances_train.json"]["images_with_lesions"] == 4  # abnormal-frac 0.5
    assert "annotations" not in json.loads((root / "annotations/instances_target.json").read_text())
    info = json.loads((root / "_info.json").read_text())
    assert info["images"]["train"] == 8


def test_demo_images_and_lesions(tmp_path):
    _run(tmp_path)
    root = tmp_path / "demo"
    coco = json.loads((root / "annotations/instances_train.json").read_text())
    assert {im["vendor"] for im in coco["images"]} == {"A"}
    for im in coco["images"]:
        a = np.asarray(Image.open(root / "images/train" / im["file_name"]))
        assert a.dtype == np.uint16 and a.shape == (128, 96)
        assert a[a > 0].size > 0.2 * a.size  # a breast is there
        side = a[:, :8].mean() > a[:, -8:].mean()  # the chest wall is on the side of the view
        assert side == (im["view"] == "L")
    for ann in coco["annotations"]:
        im = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        a = np.asarray(Image.open(root / "images/train" / im["file_name"])).astype(float) / 65535
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        inside = a[y:y + h, x:x + w]
        ring = a[max(0, y - 6):y + h + 6, max(0, x - 6):x + w + 6]
        assert inside.max() > np.median(ring) + 0.05, ann  # a lesion is brighter than its surroundings
    val = json.loads((root / "annotations/instances_val.json").read_text())
    assert {im["vendor"] for im in val["images"]} == {"B"}


def test_demo_with_expert_embeddings(tmp_path):
    pytest.importorskip("timm")
    p = argparse.ArgumentParser()
    demo_mammo.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path), "--height", "96", "--width", "64", "--train", "2", "--val", "1",
                         "--test", "1", "--target", "1", "--embed-size", "32", "--embed-grid", "2"])
    assert args.func(args) == 0
    files = sorted((tmp_path / "demo/embeddings").glob("*_embedding.npy"))
    assert [f.name for f in files][:2] == ["target_00000_embedding.npy", "test_00000_embedding.npy"]
    assert len(files) == 5
    e = np.load(files[0])
    assert e.dtype == np.float32 and e.shape == (5, 192)  # cls + 2 x 2 pooled tokens of vit_tiny
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        _run(tmp_path, "--val", "0")
    with pytest.raises(ValueError, match="height"):
        _run(tmp_path, "--height", "16")
