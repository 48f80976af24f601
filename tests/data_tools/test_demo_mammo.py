"""The synthetic mammography demo: layout, determinism, target truth, vendor shift, distractors, knobs."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from data_tools import demo_mammo, mammo_synth
from data_tools.coco_layout import Report, validate, validate_coco

H, W = 160, 128  # small renders for the unit tests


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


def _coco(root, name):
    return json.loads((root / "annotations" / f"instances_{name}.json").read_text())


def _render(seed, abnormal=True, vendor_b=False, shift=1.0, **kw):
    return mammo_synth.render(np.random.default_rng(seed), H, W, abnormal, vendor_b, shift, **kw)


def _box_contrast(img, box, margin=6):
    """Mean inside the box minus the mean of a ring of ``margin`` pixels around it."""
    x, y, w, h = (int(round(v)) for v in box)
    ring = img[max(0, y - margin):y + h + margin, max(0, x - margin):x + w + margin].copy()
    oy, ox = min(margin, y), min(margin, x)
    ring[oy:oy + h, ox:ox + w] = np.nan
    return img[y:y + h, x:x + w].mean() - np.nanmean(ring)


def test_demo_layout_and_determinism(tmp_path):
    assert _run(tmp_path / "a") == 0 and _run(tmp_path / "b") == 0
    root = tmp_path / "a" / "demo"
    assert _digest(root) == _digest(tmp_path / "b" / "demo")  # same seed: the same bytes, every file
    assert _run(tmp_path / "c", "--seed", "1") == 0
    assert _digest(tmp_path / "c" / "demo") != _digest(root)
    report = validate(root)
    assert report.ok, report.errors  # the truth file is checked against images/target
    counts = {s: report.summary[f"instances_{s}.json"]["images"] for s in ("train", "val", "test", "target")}
    assert counts == {"train": 8, "val": 4, "test": 2, "target": 3}
    assert report.summary["instances_train.json"]["images_with_lesions"] == 4  # abnormal-frac 0.5
    info = json.loads((root / "_info.json").read_text())
    assert info["images"]["train"] == 8 and info["version"] == demo_mammo.VERSION
    assert info["args"]["lesion_contrast"] == mammo_synth.DEFAULT_CONTRAST == 3.0
    assert info["args"]["lesion_size"] == mammo_synth.DEFAULT_SIZE == 2.0
    assert info["args"]["distractors"] == mammo_synth.DEFAULT_DISTRACTORS == 2.0
    assert info["args"]["shift"] == 1.0


def test_target_truth_file(tmp_path):
    _run(tmp_path, "--target", "6")
    root = tmp_path / "demo"
    target, truth = _coco(root, "target"), _coco(root, "target_truth")
    assert "annotations" not in target  # what adaptation sees: images only
    assert truth["images"] == target["images"]  # the same ids, file names and metadata
    assert {a["image_id"] for a in truth["annotations"]} <= {im["id"] for im in target["images"]}
    report = Report()
    validate_coco(truth, root / "images" / "target", "truth", report)
    assert report.ok, report.errors
    assert report.summary["truth"]["images_with_lesions"] == 3  # abnormal-frac 0.5 of 6
    assert all(im["vendor"] == "B" for im in truth["images"])
    # the truth is what render draws for those images (same seed stream as every other split)
    for im in truth["images"]:
        i = int(im["file_name"].split("_")[1].split(".")[0])
        boxes = [a["bbox"] for a in truth["annotations"] if a["image_id"] == im["id"]]
        _, lesions, _ = mammo_synth.render(np.random.default_rng([0, 3, i]), 128, 96, bool(boxes), True, 1.0,
                                          lesion_contrast=mammo_synth.DEFAULT_CONTRAST,
                                          lesion_size=mammo_synth.DEFAULT_SIZE,
                                          distractors=mammo_synth.DEFAULT_DISTRACTORS)
        assert [les["bbox"] for les in lesions] == boxes


def test_annotations_carry_type_and_density(tmp_path):
    _run(tmp_path, "--train", "12")
    coco = _coco(tmp_path / "demo", "train")
    assert len(coco["annotations"]) >= 6
    for a in coco["annotations"]:
        assert a["lesion_type"] in mammo_synth.LESION_TYPES and isinstance(a["in_dense"], bool)
        assert a["id"] // 10 == a["image_id"]
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for im in coco["images"]:
        assert 0.1 <= im["density"] <= 0.9
        assert all(d["kind"] in mammo_synth.DISTRACTOR_TYPES for d in im["distractors"])


def test_demo_images(tmp_path):
    _run(tmp_path)
    root = tmp_path / "demo"
    coco = _coco(root, "train")
    assert {im["vendor"] for im in coco["images"]} == {"A"}
    for im in coco["images"]:
        a = np.asarray(Image.open(root / "images/train" / im["file_name"]))
        assert a.dtype == np.uint16 and a.shape == (128, 96)
        assert a[a > 0].size > 0.2 * a.size  # a breast is there
        side = a[:, :8].mean() > a[:, -8:].mean()  # the chest wall is on the side of the view
        assert side == (im["view"] == "L")
    assert {im["vendor"] for im in _coco(root, "val")["images"]} == {"B"}


def test_render_is_deterministic():
    for vendor_b in (False, True):
        a, la, ma = _render(7, vendor_b=vendor_b)
        b, lb, mb = _render(7, vendor_b=vendor_b)
        assert np.array_equal(a, b) and la == lb and ma == mb
    assert not np.array_equal(_render(7)[0], _render(8)[0])


def test_shift_zero_is_vendor_a():
    assert mammo_synth.vendor_look(True, 0.0) == mammo_synth.VENDOR_A
    assert mammo_synth.vendor_look(False, 1.0) == mammo_synth.VENDOR_A
    assert mammo_synth.vendor_look(True, 1.0) == mammo_synth.VENDOR_B
    for seed in range(4):
        a, la, ma = _render(seed, vendor_b=False, shift=0.0)
        b, lb, mb = _render(seed, vendor_b=True, shift=0.0)
        assert np.array_equal(a, b) and la == lb
        assert {**ma, "vendor": "B"} == mb
        assert not np.array_equal(a, _render(seed, vendor_b=True, shift=1.0)[0])


def test_vendor_b_population_is_denser_and_smaller():
    half = mammo_synth.vendor_look(True, 0.5)
    for f in dataclasses.fields(mammo_synth.Look):  # half-way between the two vendors
        a, b = getattr(mammo_synth.VENDOR_A, f.name), getattr(mammo_synth.VENDOR_B, f.name)
        assert getattr(half, f.name) == pytest.approx((a + b) / 2)
    for seed in range(6):  # the same draws: denser and smaller for every image
        a, _, ma = _render(seed, abnormal=False)
        b, _, mb = _render(seed, abnormal=False, vendor_b=True)
        assert mb["density"] >= ma["density"]
        assert (b > 0).sum() < (a > 0).sum()


def test_distractors_are_not_annotated(tmp_path):
    img, lesions, meta = _render(3, abnormal=False, distractors=10)
    assert lesions == [] and len(meta["distractors"]) > 0
    for seed in range(4):
        a, la, ma = _render(seed, distractors=0)
        b, lb, mb = _render(seed, distractors=10)
        assert la == lb and ma["distractors"] == [] and len(mb["distractors"]) > 0
        assert not np.array_equal(a, b)
    _run(tmp_path / "none", "--distractors", "0")
    _run(tmp_path / "many", "--distractors", "12")
    for split in ("train", "val", "test", "target_truth"):
        none, many = _coco(tmp_path / "none/demo", split), _coco(tmp_path / "many/demo", split)
        assert none["annotations"] == many["annotations"]


def test_boxes_hold_the_lesion_signal():
    for seed in range(6):  # vendor A (a fixed window): the lesion changes pixels only in and next to its box
        img, lesions, _ = _render(seed)
        ref, _, _ = _render(seed, lesion_contrast=1e-6)
        diff = np.abs(img - ref)
        near = np.zeros(diff.shape, bool)
        for les in lesions:
            x, y, w, h = (int(round(v)) for v in les["bbox"])
            near[max(0, y - 4):y + h + 4, max(0, x - 4):x + w + 4] = True
        assert diff.sum() > 0 and diff[near].sum() >= 0.99 * diff.sum()


@pytest.mark.parametrize("vendor_b", [False, True])
def test_lesion_contrast_knob(vendor_b):
    one, two = [], []
    for seed in range(6):
        a, la, _ = _render(seed, vendor_b=vendor_b)
        b, lb, _ = _render(seed, vendor_b=vendor_b, lesion_contrast=2.0)
        assert la == lb  # the same lesions, twice the amplitude
        one += [_box_contrast(a, les["bbox"]) for les in la]
        two += [_box_contrast(b, les["bbox"]) for les in lb]
    assert len(one) >= 6
    assert all(q > p for p, q in zip(one, two))
    assert np.mean(two) > 1.3 * np.mean(one)


def test_demo_with_expert_embeddings(tmp_path):
    pytest.importorskip("timm")
    p = argparse.ArgumentParser()
    demo_mammo.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path), "--height", "96", "--width", "64", "--train", "2", "--val", "1",
                         "--test", "1", "--target", "1", "--expert", "vit_tiny_patch16", "--embed-size", "32",
                         "--embed-grid", "2"])
    assert args.func(args) == 0
    files = sorted((tmp_path / "demo/embeddings").glob("*_embedding.npy"))
    assert [f.name for f in files][:2] == ["target_00000_embedding.npy", "test_00000_embedding.npy"]
    assert len(files) == 5
    e = np.load(files[0])
    assert e.dtype == np.float32 and e.shape == (5, 192)  # cls + 2 x 2 pooled tokens of vit_tiny
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)


def test_ensure_demo_remakes_other_versions(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_mammo, "run", lambda args: calls.append(args.out) or 0)
    info = tmp_path / "demo" / "_info.json"
    info.parent.mkdir()
    info.write_text(json.dumps({"version": demo_mammo.VERSION}))
    assert demo_mammo.ensure_demo(tmp_path) == tmp_path / "demo" and calls == []
    info.write_text(json.dumps({"args": {}}))  # a set of the first generator (no version)
    demo_mammo.ensure_demo(tmp_path)
    assert calls == [str(tmp_path)]


def test_calibration_split(tmp_path):
    """--calib N: labelled vendor-B images of a stream of their own; every other split's bytes are unchanged."""
    _run(tmp_path / "a")
    _run(tmp_path / "b", "--calib", "3")
    a, b = tmp_path / "a" / "demo", tmp_path / "b" / "demo"
    assert not (a / "images" / "calib").exists() and not (a / "annotations" / "instances_calib.json").exists()
    for split in ("train", "val", "test", "target"):
        assert _digest(a / "images" / split) == _digest(b / "images" / split)
        assert _coco(a, split) == _coco(b, split)
    calib = _coco(b, "calib")
    assert len(calib["images"]) == 3 and len(list((b / "images" / "calib").glob("*.png"))) == 3
    assert all(im["file_name"].startswith("calib_") for im in calib["images"])
    test_ids = {im["id"] for im in _coco(b, "test")["images"]}
    assert not test_ids & {im["id"] for im in calib["images"]}
    report = validate(b)
    assert report.ok, report.errors


def test_ensure_demo_remakes_other_arguments(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_mammo, "run", lambda args: calls.append((args.seed, args.test)) or 0)
    p = argparse.ArgumentParser()
    demo_mammo.add_arguments(p)
    args = {k: v for k, v in vars(p.parse_args(["--out", "elsewhere", "--seed", "2"])).items() if k != "func"}
    info = tmp_path / "demo" / "_info.json"
    info.parent.mkdir()
    info.write_text(json.dumps({"version": demo_mammo.VERSION, "args": args}))
    demo_mammo.ensure_demo(tmp_path, ["--seed", "2"])  # the same arguments (wherever it was written): kept
    demo_mammo.ensure_demo(tmp_path)  # no arguments asked for: any complete set is kept
    assert calls == []
    demo_mammo.ensure_demo(tmp_path, ["--seed", "2", "--test", "160"])
    assert calls == [(2, 160)]


@pytest.mark.parametrize("extra, match", [(("--val", "0"), "at least one image"),
                                          (("--calib", "-1"), "calib"), (("--height", "16"), "height"),
                                          (("--shift", "-0.1"), "shift"), (("--shift", "2.5"), "shift"),
                                          (("--lesion-contrast", "0"), "lesion-contrast"),
                                          (("--distractors", "-1"), "distractors"),
                                          (("--abnormal-frac", "1.5"), "abnormal-frac")])
def test_demo_bad_arguments(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, *extra)


def test_demo_with_mae_expert(tmp_path):
    """`--expert mae`: shards from train + target only, a pretrained medssl backbone, embeddings from it."""
    p = argparse.ArgumentParser()
    demo_mammo.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path), "--height", "64", "--width", "64", "--train", "3", "--val", "1",
                         "--test", "1", "--target", "2", "--expert", "mae", "--expert-epochs", "1",
                         "--embed-size", "32", "--embed-grid", "2"])
    assert args.func(args) == 0
    demo = tmp_path / "demo"
    backbone = demo / "expert" / "pretrain" / "backbone"
    cfg = json.loads((backbone / "config.json").read_text())
    assert cfg["img_size"] in (32, [32, 32]) and str(demo / "expert" / "shards") in json.dumps(cfg)
    manifest = [json.loads(line) for line in (demo / "expert" / "shards" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in manifest) == ["target"] * 2 + ["train"] * 3  # never val / test images
    assert all(r["status"] == "written" for r in manifest)
    record = json.loads((demo / "embeddings" / "_expert.json").read_text())
    assert record["source"] == str(backbone)
    assert len(list((demo / "embeddings").glob("*_embedding.npy"))) == 7


def test_lesion_expert_masks(tmp_path):
    """The lesion expert's targets: box masks on the expert's square, at the boxes' scaled extent (hand-computed),
    images as extract_embeddings reads them, the target pool's boxes read from its truth file."""
    import torch

    from data_tools.demo_expert import _SquareMasks
    from data_tools.extract_embeddings import square_image

    for folder in ("val", "target"):
        (tmp_path / "images" / folder).mkdir(parents=True)
        Image.fromarray((np.arange(40 * 20).reshape(40, 20) * 80).astype(np.uint16)).save(
            tmp_path / "images" / folder / "a.png")
    (tmp_path / "annotations").mkdir()
    image = {"id": 1, "file_name": "a.png", "height": 40, "width": 20}
    for name, boxes in (("val", [[5, 10, 5, 10]]), ("target_truth", [[0, 0, 1, 1], [19, 39, 1, 1]])):
        anns = [{"id": k, "image_id": 1, "category_id": 1, "bbox": b} for k, b in enumerate(boxes)]
        (tmp_path / "annotations" / f"instances_{name}.json").write_text(json.dumps({"images": [image],
                                                                                      "annotations": anns}))
    got = _SquareMasks(tmp_path, ("val", "target_truth"), 10, 0.5, 0.25)
    want = torch.zeros(2, 10, 10, dtype=torch.long)
    want[0, 2:5, 2:5] = 1  # rows 10..20 x 0.25 -> 2.5..5, columns 5..10 x 0.5 -> 2.5..5
    want[1, 0, 0] = want[1, 9, 9] = 1  # a box under one pixel still marks the pixel it touches
    assert torch.equal(got.y, want)
    assert torch.equal(got.x[0], (square_image(tmp_path / "images" / "val" / "a.png", 10) - 0.5) / 0.25)
    assert got.x.shape == (2, 1, 10, 10)


def test_demo_with_lesion_expert(tmp_path):
    """`--expert lesion`: the MAE expert fine-tuned on an external set (other seed, vendor shift 0.5) that is
    deleted afterwards; the embeddings come from it."""
    p = argparse.ArgumentParser()
    demo_mammo.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path), "--height", "64", "--width", "64", "--train", "3", "--val", "2",
                         "--test", "1", "--target", "2", "--abnormal-frac", "0.5", "--expert", "lesion",
                         "--expert-epochs", "1", "--lesion-epochs", "1", "--embed-size", "32", "--embed-grid", "2"])
    assert args.func(args) == 0
    demo = tmp_path / "demo"
    lesion = demo / "expert_lesion" / "backbone"
    cfg = json.loads((lesion / "config.json").read_text())
    prov = json.dumps(cfg)
    assert "seed 1000" in prov and "shift 0.5" in prov and str(demo / "expert" / "pretrain" / "backbone") in prov
    assert not (demo / "expert_lesion" / "data").exists()  # the external images are gone
    record = json.loads((demo / "embeddings" / "_expert.json").read_text())
    assert record["source"] == str(lesion)
    assert len(list((demo / "embeddings").glob("*_embedding.npy"))) == 8


def test_expert_precision_reaches_the_expert_pretraining(tmp_path, monkeypatch):
    """--expert-precision becomes the expert MAE's train.precision (default: demo_expert.yaml's own)."""
    import data_tools.build_shards
    import medssl.pretrain
    from data_tools.demo_expert import make_expert

    seen = []
    monkeypatch.setattr(data_tools.build_shards, "main", lambda argv: 0)
    monkeypatch.setattr(medssl.pretrain, "run", lambda cfg, dist, resume=False: seen.append(cfg["train"]["precision"]))
    make_expert(tmp_path / "a", precision="fp32")
    make_expert(tmp_path / "b")
    assert seen == ["fp32", "auto"]
