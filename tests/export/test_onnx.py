"""ONNX export of a backbone and a fine-tuned classifier, run in ONNX Runtime against PyTorch on fresh inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import medssl
from medssl.export.__main__ import main
from medssl.export.onnx import META_NAME, export_onnx, onnx_session
from medssl.export.sources import load_exportable
from medssl.heads.build import load_head

ort = pytest.importorskip("onnxruntime")
TOL = 1e-4  # medssl.export.onnx.DEFAULT_RTOL for outputs of scale <= 1


def _normalised(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (x - mean) / std


def test_backbone_onnx_matches_pytorch_on_fresh_inputs(tiny_backbone, tmp_path):
    path = export_onnx(load_exportable(tiny_backbone), tmp_path / "onnx")
    meta = json.loads((tmp_path / "onnx" / META_NAME).read_text())
    assert meta["opset"] >= 17 and meta["dynamic"] == {"batch": True, "height_width": True}
    assert meta["inputs"]["images"] == ["batch", 1, "height", "width"]
    assert meta["parity"]["max_abs_diff"] < TOL and all(p["ok"] for p in meta["parity"]["probes"])
    session = onnx_session(path)
    # the reference: the backbone as load_backbone gives it, normalised by hand
    ref_model = medssl.load_backbone(tiny_backbone, dynamic_img_size=True).eval()
    g = torch.Generator().manual_seed(7)
    for shape in [(2, 1, 32, 32), (1, 1, 32, 56), (3, 1, 48, 24)]:  # non-square included
        x = torch.rand(*shape, generator=g)
        (got,) = session.run(["embedding"], {"images": x.numpy()})
        with torch.no_grad():
            want = ref_model(_normalised(x, 0.4, 0.2)).numpy()
        assert got.shape == (shape[0], 32)
        assert np.abs(got - want).max() < TOL, shape


def test_classifier_cli_export_matches_pytorch_and_check_passes(classifier_ckpt, tiny_backbone, tmp_path,
                                                                 capsys):
    ck = classifier_ckpt
    assert main([str(ck), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    meta = json.loads((tmp_path / "onnx" / META_NAME).read_text())
    assert meta["kind"] == "classify" and meta["model"]["classes"] == ["a", "b", "c"]
    card = (tmp_path / "onnx" / "README.md").read_text()  # the generated card beside the ONNX
    assert "classify (finetune), 3 classes: a, b, c" in card and str(tiny_backbone) in card
    assert "accuracy | 0.5" in card and "research only" in card
    session = onnx_session(tmp_path / "onnx" / "model.onnx")
    model, _ = load_head(ck)  # untouched: the export switched only its own copy to dynamic sizes
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 32, 32, generator=g)
    mean, std = model.backbone.medssl_cfg["mean"][0], model.backbone.medssl_cfg["std"][0]
    with torch.no_grad():
        want = model(_normalised(x, mean, std)).numpy()
    (got,) = session.run(["logits"], {"images": x.numpy()})
    assert np.abs(want).max() > 1e-3 and np.abs(got - want).max() < TOL
    # a non-square image: the same model at another size (position embedding resampled, as load_backbone does)
    dyn = load_exportable(ck).graph
    x2 = torch.rand(2, 1, 24, 40, generator=g)
    with torch.no_grad():
        want2 = dyn(x2).numpy()
        assert np.abs(dyn(x).numpy() - want).max() < 1e-6  # the dynamic switch changes nothing at 32 x 32
    (got2,) = session.run(["logits"], {"images": x2.numpy()})
    assert got2.shape == (2, 3) and np.abs(got2 - want2).max() < TOL
    # check on user images (a PNG and a non-square one)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 50), dtype=np.uint8)).save(imgs / "b.png")
    capsys.readouterr()
    assert main(["check", str(tmp_path / "onnx"), str(imgs)]) == 0
    assert "2 passed, 0 failed" in capsys.readouterr().out


def test_check_fails_against_other_weights(tiny_backbone, tmp_path, capsys):
    """Parity is a real check: the export compared with a differently initialised model fails."""
    export_onnx(load_exportable(tiny_backbone), tmp_path / "onnx")
    torch.manual_seed(5)
    other = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                              num_classes=0)
    other_dir = medssl.save_backbone(other, tmp_path / "other", mean=[0.4], std=[0.2])
    assert main(["check", str(tmp_path / "onnx"), "--source", str(other_dir)]) == 1
    assert "0 passed, 2 failed" in capsys.readouterr().out


@pytest.mark.parametrize("kind, protocol, options", [("segment", "finetune", {"blocks": 2}),
                                                     ("segment", "probe", {"blocks": 2}),
                                                     ("classify", "probe", {"probe_blocks": 2})])
def test_other_heads_export_and_match(tiny_backbone, tmp_path, kind, protocol, options):
    from medssl.heads.build import build_head, head_record, save_head

    rec = head_record(kind, protocol, tiny_backbone, num_classes=3, img_size=32, **options)
    ck = save_head(tmp_path / "model.pt", build_head(rec).eval(), rec)
    exp = load_exportable(ck)
    session = onnx_session(export_onnx(exp, tmp_path / "onnx"))
    x = torch.rand(2, 1, 24, 40, generator=torch.Generator().manual_seed(4))  # non-square, not the built size
    (got,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        want = exp.graph(x).numpy()
    assert got.shape == ((2, 3, 24, 40) if kind == "segment" else (2, 3))
    assert np.abs(got - want).max() < TOL


def test_parity_never_passes_non_finite_outputs(monkeypatch):
    """NaN compares as 'not larger' everywhere: an all-NaN ONNX output must fail the check, not pass it."""
    from medssl.export import onnx as ox

    class Session:
        def run(self, names, feeds):
            return [np.full((1, 3), np.nan, np.float32)]

    class Exp:
        kind, input_names, output_names = "backbone", ["x"], ["y"]

    monkeypatch.setattr(ox, "_run_torch", lambda exp, inputs: [np.zeros((1, 3))])
    res = ox.parity(Session(), Exp(), (torch.zeros(1, 1, 8, 8),))
    assert res["ok"] is False and res["max_abs_diff"] == float("inf")
