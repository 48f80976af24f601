"""predict on what users have: non-square images on a ViT backbone, a compressed DICOM, unreadable files among many."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import medssl
from medssl.data.coco import collate_detection, read_image
from medssl.detection.config import DEFAULTS
from medssl.detection.data import PAD_MULTIPLE, transforms
from medssl.detection.detr import build_detector, demo_detector_config, postprocess
from medssl.detection.predict import load_detector, predict_files
from medssl.metrics.detection import froc_preprocess
from medssl.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vit_detector(tmp_path_factory):
    """A ViT-backbone detector checkpoint as a stage writes it (untrained: predict's plumbing is under test)."""
    tmp = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    medssl.save_backbone(medssl.load_backbone("vit_tiny_patch8", img_size=64, in_chans=1), tmp / "bb", data="test")
    model = build_detector(demo_detector_config(backbone="vit", backbone_name=str(tmp / "bb"), img_size=64,
                                                num_queries=8)).eval()
    data = {**DEFAULTS["data"], "max_size": 64, "in_chans": 1}
    save_checkpoint(tmp / "best.pt", {"model": model.state_dict(), "detector": asdict(model.cfg), "data": data})
    return tmp / "best.pt"


def _png(path, h, w, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 65535, (h, w)).astype(np.uint16)).save(path)
    return path


def test_non_square_images_on_a_vit_backbone_match_evaluation(vit_detector, tmp_path):
    """51 x 64 after resizing (not a multiple of the patch): padded with a mask as evaluation pads it."""
    f = _png(tmp_path / "wide.png", 80, 100)
    (res,) = predict_files(vit_detector, [f], tmp_path / "out")
    model, data = load_detector(vit_detector)
    raw = read_image(f)
    img, _ = transforms({"data": data}, "none")(torch.from_numpy(raw)[None], {"boxes": torch.zeros(0, 4),
                                                                            "labels": torch.zeros(0)})
    assert img.shape[-2:] == (51, 64)  # the shape that used to fail: 51 is no multiple of 8
    images, mask, _ = collate_detection([(img, {})], pad_to_multiple=PAD_MULTIPLE)
    assert images.shape[-2:] == (64, 64) and mask[0, 51:].all() and not mask[0, :51].any()
    with torch.no_grad():
        (det,) = postprocess(model(images, mask), torch.tensor([raw.shape]), DEFAULTS["eval"]["max_dets"])
    b, s = froc_preprocess(det["boxes"], det["scores"], iou_threshold=DEFAULTS["eval"]["nms_iou"])
    assert len(res["boxes"]) > 0 and res["seconds"] > 0
    np.testing.assert_allclose(res["boxes"], np.asarray(b), atol=0.051)  # rounded to 0.1 px, original image's pixels
    np.testing.assert_allclose(res["scores"], np.asarray(s), atol=5e-5)
    centres = (np.array(res["boxes"])[:, :2] + np.array(res["boxes"])[:, 2:]) / 2
    assert (centres >= 0).all() and (centres[:, 0] <= 100).all() and (centres[:, 1] <= 80).all()


def test_bad_files_are_skipped_with_their_reason(vit_detector, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / "a.png", 64, 48)
    good = _png(folder / "b.png", 30, 90, seed=1).read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 3])  # a partial download
    (folder / "text.dcm").write_bytes(b"not dicom at all")
    res = predict_files(vit_detector, [folder], tmp_path / "out")
    assert sorted(r["file"].rsplit("/", 1)[1] for r in res) == ["a.png", "b.png"]
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert {s["file"].rsplit("/", 1)[1] for s in skipped} == {"cut.png", "text.dcm"} and all(s["reason"] for s in
                                                                                             skipped)
    assert len(json.loads((tmp_path / "out" / "predictions.json").read_text())) == 2


def test_compressed_dicom_mammogram_stand_in(vit_detector, tmp_path):
    """A 16-bit MG DICOM in RLE Lossless (a compressed transfer syntax), portrait 2000 x 1600: read, resized, found."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    arr = np.random.default_rng(2).integers(0, 4095, (2000, 1600)).astype(np.uint16)
    ds.Modality, ds.Rows, ds.Columns = "MG", 2000, 1600
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for tag in ("RescaleSlope", "RescaleIntercept"):
        if tag in ds:
            delattr(ds, tag)
    ds.compress(pydicom.uid.RLELossless, arr)
    ds.save_as(tmp_path / "mg.dcm")
    assert pydicom.dcmread(tmp_path / "mg.dcm").file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    (res,) = predict_files(vit_detector, [tmp_path / "mg.dcm"], tmp_path / "out")
    centres = (np.array(res["boxes"])[:, :2] + np.array(res["boxes"])[:, 2:]) / 2  # in the mammogram's pixels
    assert len(centres) and (centres >= 0).all() and (centres[:, 0] <= 1600).all() and (centres[:, 1] <= 2000).all()
    assert centres[:, 1].max() > 1000  # boxes span the full height, not the 64 px model input
    # the overlay is drawn at most overlay_max_side on its longer side (plus the title's 30 px); the boxes in
    # predictions.json stay in the file's own pixels; no overlay at all with overlays=False
    (small,) = predict_files(vit_detector, [tmp_path / "mg.dcm"], tmp_path / "o256", overlay_max_side=256)
    assert small["boxes"] == res["boxes"]
    assert Image.open(tmp_path / "o256" / "mg_pred.png").size == (205, 256 + 30)  # 1600 x 2000 at 0.128
    # the same through the command line: --no-overlays writes the boxes only; --overlay-max-side 0 draws whole
    import importlib.util

    spec = importlib.util.spec_from_file_location("medmask_detect", ROOT / "recipes" / "medmask_detect.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cli = ["predict", "--checkpoint", str(vit_detector), str(tmp_path / "mg.dcm"), "--out"]
    assert recipe.main([*cli, str(tmp_path / "none"), "--no-overlays"]) == 0
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["predictions.json"]
    assert json.loads((tmp_path / "none" / "predictions.json").read_text())[0]["boxes"] == res["boxes"]
    assert recipe.main([*cli, str(tmp_path / "whole"), "--overlay-max-side", "0"]) == 0
    assert Image.open(tmp_path / "whole" / "mg_pred.png").size == (1600, 2000 + 30)
    with pytest.raises(SystemExit):
        recipe.main([*cli, str(tmp_path / "bad"), "--overlay-max-side", "-1"])
