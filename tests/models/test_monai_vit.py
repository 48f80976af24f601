"""A 3-D medssl encoder in MONAI's ViT and UNETR: exact keys, the same features, through `medssl.load_backbone`."""

from __future__ import annotations

import json

import pytest
import torch

monai = pytest.importorskip("monai")

import medssl  # noqa: E402
from medssl.hub import save_backbone  # noqa: E402
from medssl.models.mae import create_mae  # noqa: E402
from medssl.models.monai_vit import (  # noqa: E402
    build_monai_vit,
    set_layernorm_eps,
    to_monai_state_dict,
    unused_monai_keys,
)


def _mae(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, spatial_dims=3, in_chans=1, cls_token=False, depth=3, decoder_embed_dim=48,
                decoder_depth=1, decoder_num_heads=4, attn_impl="sdpa")
    return create_mae("mae_vit_tiny_patch16", **{**args, **kw}).eval()


def test_keys_map_one_to_one_and_features_match_monai():
    mae = _mae()
    vit = build_monai_vit(dict(embed_dim=192, depth=3, num_heads=3, patch_size=16, img_size=[32] * 3, in_chans=1,
                               mlp_ratio=4.0, norm_eps=1e-6)).eval()
    mapped = to_monai_state_dict(mae.encoder_state_dict())
    result = vit.load_state_dict(mapped, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == unused_monai_keys(vit) == {
        f"blocks.{i}.norm_cross_attn.{p}" for i in range(3) for p in ("weight", "bias")}
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        ours = mae.forward_features(x)  # [2, 8, 192]
        theirs, hidden = vit(x)
    assert theirs.shape == ours.shape == (2, 8, 192) and len(hidden) == 3
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)  # SDPA vs MONAI's einsum attention
    mae.double(), vit.double()  # in float64 the two agree to rounding, which shows the eps matters
    with torch.no_grad():
        ours = mae.forward_features(x.double())
        torch.testing.assert_close(vit(x.double())[0], ours, rtol=0, atol=1e-10)
        set_layernorm_eps(vit, 1e-5)  # MONAI's own default
        assert (vit(x.double())[0] - ours).abs().max() > 1e-8


def test_load_backbone_gives_monai_vit_and_unetr_encoder(tmp_path):
    mae = _mae(depth=12, img_size=(32, 32, 48))  # UNETR reads blocks 3, 6, 9 of a 12-block ViT, patch 16
    folder = save_backbone(mae, tmp_path / "bb", volume={"spacing_mm": [1.5] * 3, "crop_size": [32, 32, 48]},
                           mean=[0.5], std=[0.25])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["spatial_dims"] == 3 and cfg["cls_token"] is False and cfg["img_size"] == [32, 32, 48]
    assert cfg["provenance"]["volume"]["spacing_mm"] == [1.5] * 3 and cfg["norm_eps"] == 1e-6
    vit = medssl.load_backbone(folder).eval()
    assert isinstance(vit, monai.networks.nets.ViT) and vit.medssl_cfg["img_size"] == [32, 32, 48]
    x = torch.randn(1, 1, 32, 32, 48)
    with torch.no_grad():
        feats = mae.forward_features(x)
        torch.testing.assert_close(vit(x)[0], feats, rtol=1e-4, atol=1e-5)
    # UNETR's encoder is this ViT: the same weights load into it with the same exact key report
    unetr = monai.networks.nets.UNETR(1, 3, (32, 32, 48), feature_size=8, hidden_size=192, mlp_dim=768,
                                      num_heads=3, qkv_bias=True).eval()
    result = unetr.vit.load_state_dict(vit.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(set_layernorm_eps(unetr.vit, 1e-6)(x)[0], feats, rtol=1e-4, atol=1e-5)
        assert unetr(x).shape == (1, 3, 32, 32, 48)
    # another crop resamples the position embedding; 2 channels adapt the patch embedding
    big = medssl.load_backbone(folder, img_size=64, in_chans=2)
    assert big.patch_embedding.position_embeddings.shape == (1, 64, 192)
    assert big(torch.randn(1, 2, 64, 64, 64))[0].shape == (1, 64, 192)
    with pytest.raises(ValueError, match="takes none of \\['features_only'\\]"):
        medssl.load_backbone(folder, features_only=True)


def test_anisotropic_patches_and_class_token_refused(tmp_path):
    mae = _mae(img_size=(16, 32, 32), patch_size=(4, 16, 16))
    folder = save_backbone(mae, tmp_path / "aniso")
    assert json.loads((folder / "config.json").read_text())["patch_size"] == [4, 16, 16]
    vit = medssl.load_backbone(folder).eval()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x)[0], mae.forward_features(x), rtol=1e-4, atol=1e-5)
    save_backbone(_mae(cls_token=True), tmp_path / "cls")
    with pytest.raises(ValueError, match="class token"):
        medssl.load_backbone(tmp_path / "cls")
