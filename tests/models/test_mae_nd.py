"""The N-D MAE: 3-D patchify by hand, N-D sin-cos, and the 3-D model equal to the 2-D one where they coincide."""

from __future__ import annotations

import pytest
import torch

from medssl.models.mae import MaskedAutoencoder, create_mae, patchify, unpatchify
from medssl.models.pos_embed import sincos_1d, sincos_nd


def test_patchify_3d_by_hand():
    x = torch.randn(2, 3, 4, 6, 2)  # [N, C, D, H, W], patch (2, 3, 1) -> grid (2, 2, 2)
    p = patchify(x, (2, 3, 1))
    assert p.shape == (2, 8, 2 * 3 * 1 * 3)
    # patch (gd, gh, gw) = (1, 0, 1) is number 1 * 4 + 0 * 2 + 1 = 5; inside it (a, b, c, channel) row-major
    want = torch.stack([x[1, ch, 2 + a, 0 + b, 1 + c] for a in range(2) for b in range(3) for c in range(1)
                        for ch in range(3)])
    assert torch.equal(p[1, 5], want)
    assert torch.equal(unpatchify(p, (2, 3, 1), (2, 2, 2), 3), x)


def test_sincos_nd_axes():
    emb = sincos_nd(12, (2, 3, 4))  # 4 channels per axis: w, h, d
    assert emb.shape == (24, 12)
    d, h, w = 1, 2, 3
    row = emb[d * 12 + h * 4 + w]
    for part, coord in enumerate((w, h, d)):
        torch.testing.assert_close(row[4 * part:4 * part + 4], sincos_1d(4, torch.tensor([coord]))[0].float())
    padded = sincos_nd(16, (2, 2, 2))  # 16 = 3 x 4 + 4: parts of 4 channels, the last 4 channels zero
    assert padded.shape == (8, 16) and not padded[:, 12:].any()
    torch.testing.assert_close(padded[:, :12], sincos_nd(12, (2, 2, 2)))


def _pair(norm_pix: bool = True):
    kw = dict(in_chans=2, embed_dim=24, depth=2, num_heads=2, decoder_embed_dim=12, decoder_depth=1,
              decoder_num_heads=2, norm_pix_loss=norm_pix, attn_impl="math")
    torch.manual_seed(0)
    flat = MaskedAutoencoder(img_size=(16, 24), patch_size=8, **kw)
    vol = MaskedAutoencoder(img_size=(1, 16, 24), patch_size=(1, 8, 8), spatial_dims=3, **kw)
    state = flat.state_dict()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].unsqueeze(2)  # [D, C, 1, p, p]
    # the 3-D sin-cos splits channels in thirds: take the 2-D table so that the whole model coincides
    vol.load_state_dict(state)
    return flat, vol


@pytest.mark.parametrize("norm_pix", [True, False])
def test_nd_loss_equals_2d_on_a_volume_one_patch_deep(norm_pix):
    flat, vol = _pair(norm_pix)
    imgs = torch.randn(3, 2, 16, 24)
    pred = torch.randn(3, 6, 8 * 8 * 2)
    mask = (torch.rand(3, 6) < 0.75).float()
    assert torch.equal(vol.patchify(imgs[:, :, None]), flat.patchify(imgs))
    assert torch.equal(vol.forward_loss(imgs[:, :, None], pred, mask), flat.forward_loss(imgs, pred, mask))
    noise = torch.rand(3, 6)
    loss2, pred2, mask2 = flat(imgs, 0.75, noise)
    loss3, pred3, mask3 = vol(imgs[:, :, None], 0.75, noise)
    assert torch.equal(mask2, mask3)
    torch.testing.assert_close(pred3, pred2, rtol=1e-5, atol=1e-6)  # Conv3d vs Conv2d summation order only
    torch.testing.assert_close(loss3, loss2, rtol=1e-6, atol=1e-7)


def test_3d_mae_shapes_bf16_and_attention_backends():
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, spatial_dims=3, in_chans=1, cls_token=False,
                     decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4, depth=2, norm_pix_loss=True)
    assert mae.grid == (2, 2, 2) and mae.pos_embed.shape == (1, 8, 192) and not hasattr(mae, "cls_token")
    x = torch.randn(2, 1, 32, 32, 32)
    loss, pred, mask = mae(x)
    assert pred.shape == (2, 8, 16 ** 3) and mask.sum() == 2 * 6 and torch.isfinite(loss)
    assert mae.unpatchify(mae.patchify(x)).equal(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, _, _ = mae(x)
    assert torch.isfinite(loss_bf16)
    noise = torch.rand(2, 8)
    ref = create_mae("mae_vit_tiny_patch16", img_size=32, spatial_dims=3, in_chans=1, cls_token=False,
                     decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4, depth=2, attn_impl="math")
    ref.load_state_dict(mae.state_dict())
    mae.eval(), ref.eval()
    torch.testing.assert_close(mae(x, noise=noise)[1], ref(x, noise=noise)[1], rtol=1e-4, atol=1e-5)
    anis = create_mae("mae_vit_tiny_patch16", img_size=(16, 32, 32), patch_size=(4, 16, 16), spatial_dims=3,
                      depth=1, decoder_depth=1, decoder_embed_dim=48, decoder_num_heads=4)
    assert anis.patch_size == (4, 16, 16) and anis(torch.randn(1, 1, 16, 32, 32))[1].shape == (1, 16, 1024)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_mae("mae_vit_tiny_patch16", img_size=40, spatial_dims=3)
    with pytest.raises(ValueError, match="one int or 3 ints"):
        create_mae("mae_vit_tiny_patch16", img_size=(32, 32), spatial_dims=3)


def test_2d_mae_without_class_token_loads_as_timm_vit(tmp_path):
    from medssl import load_backbone
    from medssl.hub import save_backbone

    mae = create_mae("mae_vit_tiny_patch16", img_size=32, in_chans=1, cls_token=False, depth=2,
                     decoder_depth=1, decoder_embed_dim=48, decoder_num_heads=4).eval()
    vit = load_backbone(save_backbone(mae, tmp_path / "bb")).eval()
    assert vit.cls_token is None and vit.global_pool == "avg"
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # average pooling: timm moves the final norm to fc_norm (the MAE fine-tuning layout)
        torch.testing.assert_close(vit.fc_norm(vit.forward_features(x)), mae.forward_features(x), rtol=1e-5,
                                   atol=1e-5)
