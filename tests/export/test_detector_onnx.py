"""A demo-trained MedMask detector (ResNet and ViT backbones) exported to ONNX and run in ONNX Runtime against
the PyTorch detector with its training op (the fused deformable attention)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.config import dump_config, load_config
from medssl.detection import stages
from medssl.detection.box_ops import cxcywh_to_xyxy
from medssl.detection.config import DEFAULTS
from medssl.detection.predict import load_detector, predict_files
from medssl.export.onnx import META_NAME, export_onnx, onnx_session
from medssl.export.sources import load_exportable
from tests.detection.conftest import TINY, tiny_root  # noqa: F401  (fixture)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
TOL = 1e-4  # medssl.export.onnx.DEFAULT_RTOL: scores and normalised boxes are in [0, 1]


def _vit_source(folder: Path) -> list[str]:
    """A small ViT backbone folder (2 blocks, 32 wide, patch 8) as the detector's backbone source."""
    from timm.models.vision_transformer import VisionTransformer

    import medssl

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    medssl.save_backbone(vit, folder, data="random test weights")
    return ["model.backbone=vit", f"model.backbone_name={folder}", "model.img_size=64"]


@pytest.fixture(scope="module", params=["resnet", "vit"])
def trained(request, tiny_root, tmp_path_factory):  # noqa: F811
    """(backbone kind, source_only best.pt, export folder): one short demo training run, then the export."""
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    backbone = _vit_source(out / "vit") if request.param == "vit" else []
    sets = [f"data.data_root={tiny_root}", f"data.embeddings={tiny_root / 'demo' / 'embeddings'}", f"out={out}",
            *TINY, *backbone, "eval.overlays=0"]
    cfg = load_config(DEFAULTS, Path("recipes/configs/medmask_demo.yaml"), sets)
    assert cfg["model"]["two_stage"] and cfg["model"]["with_box_refine"]  # the demo detector, as trained there
    dump_config(cfg, out / "config.yaml")  # as recipes/medmask_detect.py does
    torch.manual_seed(0)
    stages.train_stage("source_only", cfg, out)
    ck = out / "source_only" / "best.pt"
    export_onnx(load_exportable(ck), out / "onnx")
    return request.param, ck, out / "onnx"


def test_graph_has_no_custom_op_and_no_grid_sample(trained):
    _, _, folder = trained
    graph = onnx.load(str(folder / "model.onnx"))
    ops = {(n.domain or "ai.onnx", n.op_type) for n in graph.graph.node}
    assert not any(op == "GridSample" for _, op in ops)
    assert {d for d, _ in ops} <= {"ai.onnx"}, ops
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = json.loads((folder / META_NAME).read_text())
    assert meta["dynamic"] == {"batch": True, "height_width": True} and meta["size"] == [64, 64]
    assert meta["inputs"]["images"][2:] == ["32*h", "32*w"]
    assert meta["parity"]["max_abs_diff"] <= TOL


def _torch_detections(ck: Path, images: torch.Tensor, mask: torch.Tensor, top_k: int):
    """The PyTorch detector as training left it (fused deformable attention), normalised and post-processed here."""
    model, data = load_detector(ck)
    mean, std = data["mean"][0], data["std"][0]
    with torch.no_grad():
        out = model(((images - mean) / std).masked_fill(mask[:, None], 0.0), mask)
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    k = logits.shape[-1]
    scores, index = logits.sigmoid().flatten(1).topk(min(top_k, logits.shape[1] * k), dim=1)
    xyxy = cxcywh_to_xyxy(boxes).gather(1, (index // k)[..., None].expand(-1, -1, 4))
    return scores.numpy(), xyxy.numpy(), index.numpy()


def _batch(canvas, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    images, mask = torch.zeros(len(sizes), 1, *canvas), torch.ones(len(sizes), *canvas, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.rand(1, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask


# canvases other than the export's example, square and not, with square and non-square images padded in them
CASES = [((64, 64), [(64, 64), (64, 40), (32, 64)]), ((96, 160), [(96, 160), (80, 100)]), ((256, 96), [(250, 90)])]


@pytest.mark.parametrize("canvas, sizes", CASES)
def test_onnx_boxes_and_scores_equal_pytorch_on_fresh_inputs(trained, canvas, sizes):
    kind, ck, folder = trained
    meta = json.loads((folder / META_NAME).read_text())
    session = onnx_session(folder / "model.onnx")
    images, mask = _batch(canvas, sizes, seed=11)
    scores, labels, boxes, index = session.run(["scores", "labels", "boxes", "index"],
                                               {"images": images.numpy(), "mask": mask.numpy()})
    want_scores, want_boxes, want_index = _torch_detections(ck, images, mask, meta["model"]["top_k"])
    assert scores.shape == want_scores.shape and boxes.shape[-1] == 4
    for b in range(len(sizes)):
        assert sorted(index[b].tolist()) == sorted(want_index[b].tolist()), (kind, b)
        order, want_order = np.argsort(index[b]), np.argsort(want_index[b])
        assert np.abs(scores[b][order] - want_scores[b][want_order]).max() <= TOL
        assert np.abs(boxes[b][order] - want_boxes[b][want_order]).max() <= TOL
        assert (labels[b] == index[b] % 1).all()  # one class
    if len(sizes) == 3:
        assert not np.allclose(boxes[1], boxes[2])  # the padding mask reaches the graph


def test_static_export_takes_its_size_only(trained, tmp_path):
    kind, ck, _ = trained
    if kind != "resnet":
        pytest.skip("the static path does not depend on the backbone")
    exp = load_exportable(ck, size=(64, 96), static=True)
    path = export_onnx(exp, tmp_path / "static")
    meta = json.loads((tmp_path / "static" / META_NAME).read_text())
    assert meta["dynamic"]["height_width"] is False and meta["inputs"]["images"][2:] == [64, 96]
    assert meta["preprocess"]["canvas"] == [64, 96] and meta["parity"]["max_abs_diff"] <= TOL
    session = onnx_session(path)
    images, mask = _batch((64, 96), [(64, 96), (50, 70)], seed=3)
    (scores,) = session.run(["scores"], {"images": images.numpy(), "mask": mask.numpy()})
    assert np.abs(np.sort(scores, 1) - np.sort(_torch_detections(ck, images, mask, 100)[0], 1)).max() <= TOL
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(["scores"], {"images": np.zeros((1, 1, 64, 64), np.float32), "mask": np.zeros((1, 64, 64), bool)})


def test_predict_onnx_matches_predict_on_the_checkpoint(trained, tiny_root, tmp_path):  # noqa: F811
    kind, ck, folder = trained
    if kind != "resnet":
        pytest.skip("the recipe's predict path is the same for both backbones")
    spec = importlib.util.spec_from_file_location("medmask_detect", "recipes/medmask_detect.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    test_images = tiny_root / "demo" / "images" / "test"
    assert recipe.main(["predict", "--onnx", str(folder / "model.onnx"), "--out", str(tmp_path / "onnx"),
                        str(test_images)]) == 0
    got = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    want = predict_files(ck, [test_images], tmp_path / "torch")  # 64 x 64 images: no padding either way
    assert [g["file"] for g in got] == [w["file"] for w in want]
    for g, w in zip(got, want):
        assert len(g["scores"]) == len(w["scores"])
        assert np.abs(np.array(g["scores"]) - np.array(w["scores"])).max() <= 1e-3  # rounded to 4 decimals
        assert np.abs(np.array(g["boxes"]) - np.array(w["boxes"])).max() <= 0.1 + 64 * TOL  # rounded to 0.1 px
    assert len(list((tmp_path / "onnx").glob("*_pred.png"))) == len(got)


def test_card_names_the_data_and_config(trained, tiny_root):  # noqa: F811
    from medssl.export.card import card_for

    kind, ck, _ = trained
    text = card_for(load_exportable(ck), "usage")
    assert f"demo in {tiny_root}" in text and "stage | `source_only`" in text
    assert str(ck.parent.parent / "config.yaml") in text and "two_stage: true" in text
    assert "not for clinical use" in text and f"Deformable DETR ({kind} " in text


def test_check_on_user_images(trained, tiny_root, capsys):  # noqa: F811
    from medssl.export.__main__ import main

    _, _, folder = trained
    capsys.readouterr()
    assert main(["check", str(folder), str(tiny_root / "demo" / "images" / "val")]) == 0
    assert "3 passed, 0 failed" in capsys.readouterr().out
