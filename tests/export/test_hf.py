"""--format hf: the folder loads in medssl.load_backbone and timm with equal outputs; the card names its data."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer

import medssl
from medssl.export.__main__ import main


@pytest.fixture()
def trained_backbone(tmp_path):
    """A backbone folder inside a run folder with its config.yaml, trained on 'shards' with a stats.json."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "stats.json").write_text(json.dumps({"samples": 12, "by_modality": {"CT": 8, "MR": 4},
                                                   "by_source": {"ixi-demo": 12}}))
    (shards / "DATA_CARD.md").write_text("IXI demo slices, CC BY-SA 3.0, 3 subjects.")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model:\n  arch: vit_tiny_patch8\ntrain:\n  epochs: 3\n")
    folder = medssl.save_backbone(vit, tmp_path / "run" / "backbone", data=str(shards), steps=30, final_loss=0.25,
                                  mean=[0.4], std=[0.2], architecture="vit_tiny_patch8")
    return vit.eval(), folder, shards


def test_hf_folder_loads_in_medssl_and_timm(trained_backbone, tmp_path):
    vit, folder, shards = trained_backbone
    out = tmp_path / "hf"
    assert main([str(folder), "--format", "hf", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    g = torch.Generator().manual_seed(1)
    x, x2 = torch.rand(2, 1, 32, 32, generator=g), torch.rand(1, 1, 24, 40, generator=g)
    with torch.no_grad():
        want = vit(x)
        assert torch.equal(medssl.load_backbone(out).eval()(x), want)
        t = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert torch.equal(t(x), want)
        # another size through both readers: the same resampled position embedding
        a = medssl.load_backbone(out, dynamic_img_size=True).eval()(x2)
        b = timm.create_model(f"local-dir:{out}", pretrained=True, dynamic_img_size=True).eval()(x2)
        torch.testing.assert_close(a, b)
    assert t.pretrained_cfg["mean"] == [0.4] and tuple(t.pretrained_cfg["input_size"]) == (1, 32, 32)
    cfg = medssl.load_backbone(out).medssl_cfg
    assert cfg["mean"] == [0.4] and cfg["provenance"]["steps"] == 30


def test_card_names_data_config_metrics_and_intended_use(trained_backbone, tmp_path):
    _, folder, shards = trained_backbone
    out = tmp_path / "hf"
    main([str(folder), "--format", "hf", "--out", str(out)])
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "timm" and front["license"] is None  # left for the user
    assert front["datasets"] == [str(shards)] and front["medssl"]["source"] == str(folder)
    assert "research only" in text and "not for clinical use" in text
    assert "12 images" in text and "modality CT | 8" in text and "source ixi-demo | 12" in text
    assert "IXI demo slices, CC BY-SA 3.0" in text  # the data card, quoted
    assert str(tmp_path / "run" / "config.yaml") in text and "epochs: 3" in text
    assert "final_loss | 0.25" in text and "## Limitations" in text


def test_hf_refuses_a_detector_or_head(tmp_path):
    from medssl.heads.build import build_head, head_record, save_head

    rec = head_record("classify", "probe", "vit_tiny_patch16", num_classes=2, img_size=32)
    ck = save_head(tmp_path / "head.pt", build_head(rec), rec)
    with pytest.raises(ValueError, match="--format hf writes backbones"):
        main([str(ck), "--format", "hf", "--out", str(tmp_path / "hf")])
