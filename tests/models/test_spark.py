"""SparK on a timm ResNet: no leak from masked pixels, sparse BN statistics, the loss by hand, and the encoder
as plain timm ResNet weights (saved, loaded by `medssl.load_backbone` and by timm itself)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import medssl
from medssl.models.spark import SparseBatchNorm2d, SparseContext, create_spark, resize_mask, sparsify


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(img_size=64, in_chans=1, mask_patch=16, decoder_dim=32)
    args.update(kw)
    return create_spark("spark_resnet18", **args)


def test_masked_pixels_do_not_leak_into_visible_features():
    model = _tiny()
    imgs = torch.rand(2, 1, 64, 64)
    noise = torch.rand(2, 16)
    active = model.random_active(2, 0.6, noise=noise)  # [2, 1, 4, 4]
    assert active.sum().item() == 2 * round(16 * 0.4)
    pixels = resize_mask(active, (64, 64))  # [2, 1, 64, 64]
    changed = torch.where(pixels, imgs, torch.randn_like(imgs) * 5)  # other values in every masked pixel
    outs = []
    for x in (imgs, changed):
        feats, masks = model.encode(x, active)  # training mode: sparse BN on the batch
        _, pred, _ = model(x, 0.6, noise=noise)
        outs.append((feats, masks, pred))
    (fa, ma, pa), (fb, _, pb) = outs
    for f, g, m in zip(fa, fb, ma):
        assert torch.equal(f * m, g * m)  # visible positions: the same features
        assert not (f * ~m).any()  # masked positions: exactly zero at every stage
    assert torch.equal(pa, pb)  # hence the same prediction everywhere (masked cells see only mask tokens)
    assert (fa[0] * ma[0]).abs().sum() > 0


def test_leak_free_only_because_sparse():
    """The same encoder run densely on the zero-filled image differs: the sparse run is not a no-op."""
    model = _tiny()
    imgs = torch.rand(2, 1, 64, 64)
    active = model.random_active(2, 0.6, noise=torch.rand(2, 16))
    feats, masks = model.encode(imgs, active)
    dense, _ = model.encode(imgs * resize_mask(active, (64, 64)), None)
    assert not torch.allclose(feats[0] * masks[0], dense[0] * masks[0])


def test_sparse_batchnorm_uses_visible_statistics():
    ctx = SparseContext()
    bn = SparseBatchNorm2d(3)
    bn.sparse = ctx
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(2, 3, 4, 4) * 3 + 1
    active = torch.tensor([[[[1, 0], [0, 1]]], [[[1, 1], [0, 0]]]], dtype=torch.bool)  # [2, 1, 2, 2]
    ctx.set(active)
    y = bn(x)
    vis = resize_mask(active, (4, 4))[:, 0]  # [2, 4, 4]: 2 x 2 pixels per cell
    xs = x.permute(0, 2, 3, 1)[vis]  # [16, 3] by hand
    mean, var_b, var_u = xs.mean(0), xs.var(0, unbiased=False), xs.var(0, unbiased=True)
    expect = (x - mean[:, None, None]) / torch.sqrt(var_b[:, None, None] + bn.eps) * bn.weight[:, None, None] \
        + bn.bias[:, None, None]
    v = vis[:, None].expand_as(x)
    torch.testing.assert_close(y[v], expect[v])
    assert not y[~v].any()
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var_u)
    assert bn.num_batches_tracked.item() == 1
    ctx.set(None)  # outside a masked pass: timm's dense BN
    torch.testing.assert_close(bn(x), torch.nn.functional.batch_norm(
        x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))


def test_loss_by_hand_one_image_four_cells():
    model = _tiny(mask_patch=32, in_chans=2)  # 64 px: 2 x 2 cells of 32 px
    img = torch.rand(1, 2, 64, 64)
    noise = torch.tensor([[0.1, 0.9, 0.5, 0.2]])  # ratio 0.5 keeps the two smallest: cells 0 and 3
    loss, pred, mask = model(img, 0.5, noise=noise)
    assert mask.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    active = model.random_active(1, 0.5, noise=noise)
    out = model.decode(*model.encode(img, active))  # [1, 2, 64, 64]
    errs = []
    for cell in range(4):
        i, j = divmod(cell, 2)
        sl = (0, slice(None), slice(32 * i, 32 * i + 32), slice(32 * j, 32 * j + 32))
        p = out[sl].permute(1, 2, 0).reshape(-1)  # (h, w, c) order, channel innermost
        torch.testing.assert_close(pred[0, cell], p)
        t = img[sl].permute(1, 2, 0).reshape(-1)
        t = (t - t.mean()) / (t.var() + 1e-6) ** 0.5
        errs.append(((p - t) ** 2).mean())
    torch.testing.assert_close(loss, (errs[1] + errs[2]) / 2)


def test_encoder_is_timm_resnet18_and_round_trips(tmp_path):
    model = _tiny()
    model(torch.rand(4, 1, 64, 64))  # one training pass: running statistics move off their initial values
    state = model.encoder_state_dict()
    plain = timm.create_model("resnet18", pretrained=False, in_chans=1)
    result = plain.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    folder = medssl.save_backbone(model, tmp_path / "bb", data="toy", steps=1)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["family"] == "cnn" and cfg["architecture"] == "resnet18" and cfg["in_chans"] == 1
    assert cfg["provenance"]["objective"] == "spark" and cfg["mean"] == [0.5]
    loaded = medssl.load_backbone(folder)  # timm's ResNet, pooled features
    assert type(loaded) is type(plain) and loaded.num_classes == 0
    plain.reset_classifier(0)
    x = torch.rand(2, 1, 64, 64)
    for m in (loaded, plain, model.encoder):
        m.eval()
    with torch.no_grad():
        ref = plain(x)
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(model.encoder(x), ref, rtol=0, atol=0)  # dense outside a masked pass
    head = medssl.load_backbone(folder, num_classes=3)
    assert head(x).shape == (2, 3)
    feats = medssl.load_backbone(folder, features_only=True, out_indices=(2, 3, 4))
    assert [f.shape[1] for f in feats(x)] == [128, 256, 512]
    rgb = medssl.load_backbone(folder, in_chans=3)  # the first conv adapted, as the ViT's patch embedding
    assert rgb.conv1.weight.shape[1] == 3
    assert loaded.medssl_cfg["architecture"] == "resnet18" and loaded.medssl_cfg["family"] == "cnn"
    # the strict key report: a foreign key is named, not ignored
    bad = dict(state, extra=torch.zeros(1))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bad.items()}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        medssl.load_backbone(folder)


def test_plain_timm_resnet_state_dict_is_a_backbone_source(tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", pretrained=False, in_chans=1)
    torch.save(plain.state_dict(), tmp_path / "r18.pth")
    loaded = medssl.load_backbone(tmp_path / "r18.pth", num_classes=1000)  # name found from the block counts
    plain.eval()
    loaded.eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x), rtol=0, atol=0)


def test_224_px_default_cells_and_bad_arguments():
    model = create_spark("spark_resnet18", img_size=224, in_chans=1, decoder_dim=32)
    assert model.grid == (7, 7) and model.patch_size == 32  # SparK's own granularity
    active = model.random_active(2, 0.6, noise=torch.rand(2, 49))
    assert active.flatten(1).sum(1).tolist() == [20, 20]
    loss, pred, mask = model(torch.rand(2, 1, 224, 224), 0.6)
    assert torch.isfinite(loss) and pred.shape == (2, 49, 32 * 32) and mask.sum().item() == 2 * 29
    feats, masks = model.encode(torch.rand(2, 1, 224, 224), active)
    assert [f.shape[-1] for f in feats] == [7, 14, 28, 56]  # strides 32, 16, 8, 4
    assert all(torch.equal(m, resize_mask(active, f.shape[-2:])) for f, m in zip(feats, masks))
    with pytest.raises(ValueError, match="power of two"):
        create_spark("spark_resnet18", img_size=64, mask_patch=12)
    with pytest.raises(ValueError, match="multiple"):
        create_spark("spark_resnet18", img_size=80)
    with pytest.raises(ValueError, match="mask_ratio"):
        _tiny().random_active(1, 1.0)
    with pytest.raises(ValueError, match="spark_"):
        create_spark("resnet18")
    se = timm.create_model("seresnet18", pretrained=False)
    with pytest.raises(ValueError, match="sparsely"):
        sparsify(se, SparseContext())


def test_mask_tokens_are_kept_out_of_weight_decay():
    from medssl.pretrain import MAETask

    groups = MAETask(_tiny(), 0.6).param_groups(0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}
    assert {"mask_tokens.0", "mask_tokens.3"} <= no_decay
    assert "encoder.conv1.weight" not in no_decay and "encoder.bn1.weight" in no_decay
