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


def test_loss_by_hand_with_a_non_symmetric_mask():
    """Only cell 1 of the 2 x 2 grid is kept (row 0, column 1): a row / column swap of the mask against
    `patchify` would keep cell 2 instead, which changes both the loss and what the encoder sees."""
    model = _tiny(mask_patch=32)  # 64 px: 2 x 2 cells of 32 px
    img = torch.rand(2, 1, 64, 64)  # two images (sparse BN needs more than one visible value at stride 32)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.7]] * 2)  # ratio 0.75 keeps the one smallest: cell 1
    loss, pred, mask = model(img, 0.75, noise=noise)
    assert mask.tolist() == [[1.0, 0.0, 1.0, 1.0]] * 2
    visible = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    visible[..., 0:32, 32:64] = True  # cell 1 by hand: the top-right quarter
    out = model.decode(*model.encode(img, model.random_active(2, 0.75, noise=noise)))  # [2, 1, 64, 64]
    errs = torch.zeros(2, 4)
    for n in range(2):
        for cell, (r, c) in enumerate([(0, 0), (0, 32), (32, 0), (32, 32)]):
            p = out[n, 0, r:r + 32, c:c + 32].reshape(-1)
            torch.testing.assert_close(pred[n, cell], p)
            t = img[n, 0, r:r + 32, c:c + 32].reshape(-1)
            errs[n, cell] = ((p - (t - t.mean()) / (t.var() + 1e-6) ** 0.5) ** 2).mean()
    torch.testing.assert_close(loss, errs[:, [0, 2, 3]].mean())
    assert not torch.allclose(loss, errs[:, [0, 1, 3]].mean())  # the transposed mask's loss differs
    # the encoder sees the top-right quarter only: other pixels elsewhere change nothing, there they do
    outside = torch.where(visible, img, torch.rand_like(img))
    inside = torch.where(visible, torch.rand_like(img), img)
    for x, same in ((outside, True), (inside, False)):
        _, pred_x, _ = model(x, 0.75, noise=noise)
        assert torch.equal(pred_x, pred) is same


def _stage_masked(model: torch.nn.Module, active: torch.Tensor) -> list[int]:
    """Masked positions per encoder stage (strides 4, 8, 16, 32), counted over the batch of masks `active`."""
    sizes = [tuple(f.shape[-2:]) for f in model.encode(torch.rand(1, 1, 64, 64), active[:1])[0]][::-1]
    assert sizes == [(16, 16), (8, 8), (4, 4), (2, 2)]
    return [int((~resize_mask(active, s)).sum()) for s in sizes]


def test_masked_fraction_per_stage_over_every_mask():
    """Exact, over every mask the ratio allows. 32 px cells (2 x 2 grid, 2 of 4 masked): 1/2 at every stage.
    16 px cells (4 x 4 grid, 10 of 16 masked): 10/16 at strides 4-16, but a stride-32 position covers 4 cells
    and is masked only when all 4 are: C(12, 6) / C(16, 10) = 924 / 8008 = 3/26 ~ 0.115."""
    from itertools import combinations
    from math import comb

    for patch, cells, keep in ((32, 4, 2), (16, 16, 6)):
        model = _tiny(mask_patch=patch)
        sets = list(combinations(range(cells), keep))
        noise = torch.ones(len(sets), cells)
        for row, kept in zip(noise, sets):
            row[list(kept)] = 0.0  # the kept cells have the smallest noise
        active = model.random_active(len(sets), 0.6, noise=noise)
        assert active.flatten(1).sum(1).eq(keep).all() and len({tuple(a.flatten().tolist()) for a in active}) == len(
            sets)
        masked = _stage_masked(model, active)
        positions = [len(sets) * (64 // s) ** 2 for s in (4, 8, 16, 32)]
        if patch == 32:
            assert [m / n for m, n in zip(masked, positions)] == [0.5] * 4
        else:
            assert len(sets) == comb(16, 10) == 8008
            assert [m / n for m, n in zip(masked[:3], positions[:3])] == [0.625] * 3
            assert masked[3] == 4 * comb(12, 6)  # each of the 4 positions: all 4 cells among the 10 masked
            assert masked[3] * 26 == positions[3] * 3  # 3/26 exactly


def test_masked_fraction_of_random_masks():
    """The batch RNG's masks (seeded, 10,000 images) agree with the exact figures: 0.625 and ~0.115 (3/26)."""
    model = _tiny(mask_patch=16)
    torch.manual_seed(0)
    active = model.random_active(10_000, 0.6)
    masked = _stage_masked(model, active)
    fractions = [m / (10_000 * (64 // s) ** 2) for m, s in zip(masked, (4, 8, 16, 32))]
    assert fractions[:3] == [0.625] * 3
    assert abs(fractions[3] - 3 / 26) < 0.01


def test_a_grid_of_one_cell_is_refused():
    with pytest.raises(ValueError, match="at least 2 cells"):
        create_spark("spark_resnet18", img_size=64, in_chans=1, mask_patch=64, decoder_dim=16)
    with pytest.raises(ValueError, match="at least 2 cells"):
        create_spark("spark_resnet18", img_size=32, in_chans=1, decoder_dim=16)  # default cell: the stride, 32
    assert _tiny(mask_patch=32).grid == (2, 2)


def test_loss_decreases_on_a_fixed_batch():
    """A few AdamW steps on one batch with fixed masks (seeded): the loss falls at every step, by over 10% in all
    (measured: 1.129 -> 0.976)."""
    model = _tiny(decoder_dim=16)
    torch.manual_seed(0)
    imgs = torch.rand(4, 1, 64, 64)
    noise = torch.rand(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, _, _ = model(imgs, 0.6, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses


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
    ref_feats = timm.create_model("resnet18", pretrained=False, in_chans=1, features_only=True, out_indices=(2, 3, 4))
    result = ref_feats.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []  # the same weights, every key
    feats.eval()
    ref_feats.eval()
    with torch.no_grad():
        got, want = feats(x), ref_feats(x)
        assert [f.shape[1] for f in got] == [128, 256, 512]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        torch.testing.assert_close(got[-1], model.encoder.forward_features(x), rtol=0, atol=0)
    rgb = medssl.load_backbone(folder, in_chans=3)  # the first conv adapted, as the ViT's patch embedding
    w1 = state["conv1.weight"]  # [64, 1, 7, 7]
    # load_backbone's documented adaptation (medssl.hub.adapt_patch_embed): the 1-channel filter repeated over the
    # 3 channels and scaled by 1/3, so a gray image given as RGB gives the 1-channel model's output
    torch.testing.assert_close(rgb.conv1.weight, w1.repeat(1, 3, 1, 1) / 3)
    rgb.eval()
    with torch.no_grad():
        torch.testing.assert_close(rgb(x.expand(-1, 3, -1, -1)), ref, rtol=1e-4, atol=1e-5)
        for k, v in rgb.state_dict().items():
            if k != "conv1.weight":
                torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
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
    imgs = torch.rand(2, 1, 224, 224)
    loss, pred, mask = model(imgs, 0.6)
    assert pred.shape == (2, 49, 32 * 32) and mask.sum().item() == 2 * 29
    t = imgs.unfold(2, 32, 32).unfold(3, 32, 32)[:, 0].reshape(2, 49, 32 * 32)  # cells in row-major order, by hand
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_cell = ((pred - t) ** 2).mean(-1)  # [2, 49]
    torch.testing.assert_close(loss, per_cell[mask.bool()].mean())
    assert not torch.allclose(loss, per_cell.mean())  # the visible cells are left out
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
