import math

import pytest
import torch

from medssl.models.mae import MaskedAutoencoder, create_mae


def _tiny(**kw):
    args = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=4,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    args.update(kw)
    return MaskedAutoencoder(**args)


@pytest.mark.parametrize("c,h,w", [(1, 32, 32), (3, 32, 48), (2, 16, 24)])
def test_patchify_layout_and_round_trip(c, h, w):
    m = _tiny(img_size=(h, w), in_chans=c)
    imgs = torch.randn(2, c, h, w)
    x = m.patchify(imgs)
    p = 8
    assert x.shape == (2, (h // p) * (w // p), p * p * c)
    # independent: patch (i, j) holds pixels [i*p:(i+1)*p, j*p:(j+1)*p] ordered (row, col, channel)
    gw = w // p
    for idx in (0, 1, x.shape[1] - 1):
        i, j = divmod(idx, gw)
        block = imgs[1, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # [C, p, p]
        torch.testing.assert_close(x[1, idx], block.permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(m.unpatchify(x), imgs)


def test_random_masking_counts_and_restore():
    n, length, d, ratio = 3, 50, 4, 0.75
    x = torch.randn(n, length, d)
    noise = torch.rand(n, length)
    xm, mask, ids_restore = MaskedAutoencoder.random_masking(x, ratio, noise)
    keep = int(length * (1 - ratio))
    assert xm.shape == (n, keep, d)
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - keep)))
    # kept = the `keep` smallest noise values, mask in original order
    for b in range(n):
        kept = set(torch.topk(noise[b], keep, largest=False).indices.tolist())
        assert set((mask[b] == 0).nonzero().flatten().tolist()) == kept
        # x_masked lists the kept patches in order of increasing noise
        order = sorted(kept, key=lambda i: noise[b, i].item())
        torch.testing.assert_close(xm[b], x[b, order])
    # ids_restore inverts the shuffle
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(n, -1))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_is_masked_mse(norm_pix):
    m = _tiny(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 1, 32, 32)
    loss, pred, mask = m(imgs, mask_ratio=0.75)
    # hand-written: per-patch target, MSE per patch, mean over removed patches only
    p = 8
    total, count = 0.0, 0
    for b in range(2):
        for idx in range(16):
            i, j = divmod(idx, 4)
            t = imgs[b, 0, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
            if norm_pix:
                mu = t.sum() / t.numel()
                var = ((t - mu) ** 2).sum() / (t.numel() - 1)  # unbiased
                t = (t - mu) / math.sqrt(var.item() + 1e-6)
            if mask[b, idx] == 1:
                total += ((pred[b, idx] - t) ** 2).mean().item()
                count += 1
    assert count == 2 * (16 - int(16 * 0.25))
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_official_parameter_names_and_init():
    m = create_mae("mae_vit_base_patch16", in_chans=3, img_size=224)
    keys = set(m.state_dict())
    expected = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight",
                "patch_embed.proj.bias", "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    for prefix, n in (("blocks", 12), ("decoder_blocks", 8)):
        for i in range(n):
            for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                expected |= {f"{prefix}.{i}.{part}.weight", f"{prefix}.{i}.{part}.bias"}
    assert keys == expected
    assert m.decoder_embed.out_features == 512 and len(m.decoder_blocks) == 8
    assert m.decoder_blocks[0].attn.num_heads == 16
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    assert torch.equal(m.pos_embed[0, 0], torch.zeros(768))
    assert m.norm.eps == 1e-6 and m.blocks[0].norm1.eps == 1e-6
    # xavier uniform: |w| <= sqrt(6 / (fan_in + fan_out)); biases zero; tokens ~ N(0, 0.02)
    w = m.blocks[0].attn.qkv.weight
    assert w.abs().max() <= math.sqrt(6 / (768 + 3 * 768)) + 1e-6
    assert torch.count_nonzero(m.blocks[0].attn.qkv.bias) == 0
    pw = m.patch_embed.proj.weight.reshape(768, -1)
    assert pw.abs().max() <= math.sqrt(6 / (768 + pw.shape[1])) + 1e-6
    assert 0.01 < m.cls_token.std().item() < 0.03


def test_bad_arguments():
    with pytest.raises(ValueError, match="smaller than one patch"):
        _tiny(img_size=4)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedAutoencoder.random_masking(torch.zeros(1, 4, 2), 1.0)
    with pytest.raises(KeyError, match="unknown backbone"):
        create_mae("mae_vit_gigantic_patch3")
    with pytest.raises(TypeError, match="unknown arguments"):
        create_mae("mae_vit_tiny_patch16", decoder_widht=3)
