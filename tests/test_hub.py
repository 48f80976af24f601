import json

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import medssl
from medssl.hub import load_mae_weights
from medssl.models.mae import create_mae


def _mae(**kw):
    args = dict(img_size=32, in_chans=1, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    args.update(kw)
    return create_mae("mae_vit_tiny_patch16", **args)


def _visible_all(n, length):
    return torch.arange(float(length)).expand(n, -1)


def test_save_load_round_trip_matches_mae_encoder(tmp_path):
    mae = _mae().eval()
    medssl.save_backbone(mae, tmp_path / "bb", data="unit-test", steps=3)
    cfg = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert cfg["provenance"]["data"] == "unit-test" and cfg["in_chans"] == 1 and cfg["patch_size"] == 16
    vit = medssl.load_backbone(tmp_path / "bb").eval()
    x = torch.rand(2, 1, 32, 32)
    latent, _, _ = mae.forward_encoder(x, 0.0, noise=_visible_all(2, 4))
    torch.testing.assert_close(vit.forward_features(x), latent)


def test_official_mae_checkpoint_formats(tmp_path):
    """Official releases: {'model': encoder only} (pretrain) and with decoder (visualize), RGB, 'args'."""
    import argparse

    rgb = _mae(in_chans=3)
    enc_only = {k: v for k, v in rgb.state_dict().items() if not k.startswith("decoder_") and k != "mask_token"}
    torch.save({"model": enc_only, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "mae_pretrain.pth")
    torch.save({"model": rgb.state_dict()}, tmp_path / "mae_visualize.pth")
    for name in ("mae_pretrain.pth", "mae_visualize.pth"):
        vit = medssl.load_backbone(tmp_path / name, in_chans=1, img_size=48)
        assert vit.patch_embed.proj.weight.shape == (192, 1, 16, 16)
        # RGB filters summed for one channel
        torch.testing.assert_close(vit.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(1, keepdim=True))
        assert vit.pos_embed.shape == (1, 1 + 9, 192)
        torch.testing.assert_close(vit.pos_embed[:, 0], rgb.pos_embed[:, 0])  # cls row untouched
        # grey image in 1 channel == same grey image in 3 channels through the RGB model
        x = torch.rand(1, 1, 32, 32)
        vit32 = medssl.load_backbone(tmp_path / name, in_chans=1)
        lat, _, _ = rgb.forward_encoder(x.expand(-1, 3, -1, -1), 0.0, noise=_visible_all(1, 4))
        torch.testing.assert_close(vit32.forward_features(x), lat, rtol=1e-4, atol=1e-4)
    # and as an MAE to continue pretraining on 1-channel medical data
    mae1 = _mae()
    report = load_mae_weights(mae1, tmp_path / "mae_visualize.pth")
    assert "decoder_pred.weight" in report["fresh"] and "blocks.0.attn.qkv.weight" in report["loaded"]
    torch.testing.assert_close(mae1.decoder_blocks[0].attn.qkv.weight, rgb.decoder_blocks[0].attn.qkv.weight)
    loss, _, _ = mae1(torch.rand(2, 1, 32, 32))
    assert torch.isfinite(loss)


def test_plain_timm_state_dict_and_heads(tmp_path):
    vit = medssl.create_vit("vit_tiny_patch16", img_size=32, in_chans=1, num_classes=4)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "w.safetensors"))
    again = medssl.load_backbone(tmp_path / "w.safetensors", num_classes=4)
    torch.testing.assert_close(again.head.weight, vit.head.weight)  # same-shaped head is kept
    other = medssl.load_backbone(tmp_path / "w.safetensors", num_classes=7, global_pool="avg")
    assert other.head.out_features == 7
    torch.testing.assert_close(other.fc_norm.weight, vit.norm.weight)  # norm moved to fc_norm


def test_features_only_and_random_init():
    feats = medssl.load_backbone("vit_tiny_patch16", img_size=32, in_chans=1, features_only=True)
    maps = feats(torch.rand(2, 1, 48, 64))  # dynamic size
    assert [m.shape for m in maps] == [(2, 192, 3, 4)] * 4
    assert [f["module"] for f in feats.feature_info] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert "vit_tiny_patch16" in medssl.list_backbones()


def test_wrong_keys_raise_with_the_list(tmp_path):
    vit = medssl.create_vit("vit_tiny_patch16", img_size=32, in_chans=1)
    state = vit.state_dict()
    state["blocks.0.extra.weight"] = torch.zeros(3)
    del state["blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\].*blocks.0.extra.weight"):
        medssl.load_backbone(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="not a registered architecture"):
        medssl.load_backbone(tmp_path / "nope.pth")


def test_pickled_objects_are_refused(tmp_path):
    import fractions

    torch.save({"model": {}, "obj": fractions.Fraction(1, 3)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        medssl.load_backbone(tmp_path / "evil.pth")


@pytest.mark.parametrize("make", ["vit", "mae", "vit_no_cls", "mae_no_cls"])
def test_backbone_record_reads_config_json_alone(tmp_path, make):
    from medssl.hub import backbone_config, backbone_record
    from medssl.models.vit import build_vit

    no_cls = make.endswith("no_cls")
    if make.startswith("vit"):
        model = build_vit(32, 2, 2, 8, 32, 1, mlp_ratio=2.0, **({"class_token": False, "global_pool": "avg"}
                                                                  if no_cls else {}))
    else:
        model = _mae(cls_token=not no_cls)
    medssl.save_backbone(model, tmp_path / "run" / "backbone", data="unit-test")
    folder = tmp_path / "run" / "backbone"
    from_weights = tmp_path / "old"  # an old config.json without the architecture: read from the state dict
    from_weights.mkdir()
    (from_weights / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    (from_weights / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "depth"}))
    expected = backbone_record(from_weights)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")  # never opened
    for source in (folder, tmp_path / "run"):
        rec = backbone_record(source)
        assert rec["where"] == f"backbone folder {folder}"
        assert {k: v for k, v in rec.items() if k not in ("where", "meta")} == \
               {k: v for k, v in expected.items() if k not in ("where", "meta")}
        assert rec["meta"]["provenance"]["data"] == "unit-test"
        assert rec.get("cls_token", True) is not no_cls
    with pytest.raises(SafetensorError):  # the weights themselves are read where they are loaded
        medssl.load_backbone(folder)
    assert backbone_config(tmp_path / "run")["provenance"]["data"] == "unit-test"
    assert backbone_config(tmp_path / "run" / "checkpoints" / "checkpoint-3.pt") == cfg  # the run a file lies in
    assert backbone_config(tmp_path / "elsewhere.pt") == {}
