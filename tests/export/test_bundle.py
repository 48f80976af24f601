"""--format bundle: a MONAI bundle that MONAI's own bundle tools read, build and load, with its ONNX inside."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.export.__main__ import main
from medssl.export.onnx import onnx_session
from medssl.export.sources import load_exportable

monai_bundle = pytest.importorskip("monai.bundle")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(classifier_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "clf_bundle"
    assert main([str(classifier_ckpt), "--format", "bundle", "--out", str(out)]) == 0
    return out


def test_layout_and_metadata(bundle, classifier_ckpt):
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.onnx",
                "models/medssl_export.json", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    # the fields MONAI's metadata schema requires, and ours
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright", "network_data_format",
                "intended_use", "data_source"):
        assert key in meta, key
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 1 and fmt["inputs"]["image"]["spatial_shape"] == [32, 32]
    assert fmt["outputs"]["pred"]["num_channels"] == 3
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "a", "1": "b", "2": "c"}
    assert "not for clinical use" in meta["intended_use"] and meta["eval_metrics"] == {"accuracy": 0.5}
    assert meta["medssl"]["onnx_parity"]["max_abs_diff"] < 1e-4
    card = (bundle / "docs" / "README.md").read_text()
    assert card.startswith("---\n") and str(classifier_ckpt) in card and "accuracy | 0.5" in card


def test_monai_checks_build_the_network_and_load_the_weights(bundle, classifier_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(bundle)  # inference.json's bundle_root is "."
    cfg, meta = "configs/inference.json", "configs/metadata.json"
    monai_bundle.verify_net_in_out(net_id="network_def", meta_file=meta, config_file=cfg, device="cpu")
    ts = tmp_path / "model.ts"
    monai_bundle.ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file="models/model.pt", meta_file=meta,
                             config_file=cfg, use_trace=True, input_shape=[1, 1, 32, 32])
    scripted = torch.jit.load(str(ts))
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_exportable(classifier_ckpt).graph(x)
        torch.testing.assert_close(scripted(x), want)  # MONAI's loader put every weight in place
    (got,) = onnx_session("models/model.onnx").run(["logits"], {"images": x.numpy()})
    assert np.abs(got - want.numpy()).max() < 1e-4


@pytest.mark.skipif(not os.environ.get("MEDSSL_MONAI_SCHEMA"),
                    reason="MONAI's verify_metadata downloads its JSON schema; set MEDSSL_MONAI_SCHEMA to a local copy")
def test_monai_verify_metadata(bundle):
    pytest.importorskip("jsonschema")
    monai_bundle.verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"),
                                 filepath=str(Path(os.environ["MEDSSL_MONAI_SCHEMA"])))
