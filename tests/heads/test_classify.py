"""Linear probe, multi-block probe, fine-tuning head, layer-wise lr decay, class balancing."""

import numpy as np
import pytest
import torch

from medssl.heads.classify import (
    FineTuneClassifier,
    LinearProbe,
    balanced_sampler,
    class_weights,
    layer_decay_groups,
    layer_id,
)

from ._vit import tiny_vit

torch.set_num_threads(1)


def test_linear_probe_matches_mae_recipe():
    torch.manual_seed(0)
    vit = tiny_vit()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ref_cls = vit.forward_features(x)[:, 0]  # timm: final norm, then cls token
        ref_mean = vit.forward_features(x)[:, 1:].mean(1)
    probe = LinearProbe(vit, 3, pool="cls")
    torch.testing.assert_close(probe.features(x), ref_cls)
    torch.testing.assert_close(LinearProbe(vit, 3, pool="mean").features(x), ref_mean)
    bn, lin = probe.head
    assert not bn.affine and bn.eps == 1e-6
    assert abs(lin.weight.std().item() - 0.01) < 0.004 and lin.bias.abs().sum() == 0
    assert all(not p.requires_grad for p in probe.backbone.parameters())
    probe.train()
    assert not probe.backbone.training and probe.head.training
    assert probe(x).shape == (4, 3)


def test_multi_block_probe_concatenates_blocks():
    torch.manual_seed(0)
    vit = tiny_vit(depth=4)
    x = torch.randn(2, 1, 32, 32)
    probe = LinearProbe(vit, 2, pool="cls+mean", num_blocks=3)
    f = probe.features(x)
    assert f.shape == (2, 24 * 3 * 2)
    # independent: run the blocks by hand
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        outs = []
        for blk in vit.blocks:
            t = blk(t)
            outs.append(t)
        parts = []
        for j, o in enumerate(outs[1:]):
            o = vit.norm(o) if j == 2 else torch.nn.functional.layer_norm(o, (24,), eps=1e-6)
            parts += [o[:, 0], o[:, 1:].mean(1)]
    torch.testing.assert_close(f, torch.cat(parts, -1))


def test_finetune_head_matches_hand_forward():
    torch.manual_seed(0)
    vit = tiny_vit()
    model = FineTuneClassifier(vit, 5, drop_path_rate=0.1).eval()
    assert abs(model.head.weight.std().item() - 2e-5) < 1e-5
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        t = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))
        ref = model.head(model.fc_norm(t[:, 1:].mean(1)))
    torch.testing.assert_close(model(x), ref)
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(vit.blocks[0].drop_path1, torch.nn.Identity)


def test_layer_ids_and_decay_scales():
    depth = 3
    assert layer_id("backbone.cls_token", depth) == 0
    assert layer_id("backbone.pos_embed", depth) == 0
    assert layer_id("backbone.patch_embed.proj.weight", depth) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", depth) == 1
    assert layer_id("backbone.blocks.2.mlp.fc1.bias", depth) == 3
    assert layer_id("fc_norm.weight", depth) == 4 and layer_id("head.weight", depth) == 4
    model = FineTuneClassifier(tiny_vit(depth=depth), 2)
    groups = layer_decay_groups(model, depth, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    by_name = {}
    for g in groups:
        for p in g["params"]:
            by_name[id(p)] = g
    named = dict(model.named_parameters())
    g = by_name[id(named["backbone.patch_embed.proj.weight"])]
    assert g["lr_scale"] == pytest.approx(0.5**4) and g["weight_decay"] == 0.05
    g = by_name[id(named["backbone.cls_token"])]
    assert g["lr_scale"] == pytest.approx(0.5**4) and g["weight_decay"] == 0.0
    g = by_name[id(named["backbone.blocks.1.attn.qkv.weight"])]
    assert g["lr_scale"] == pytest.approx(0.5**2)
    g = by_name[id(named["head.bias"])]
    assert g["lr_scale"] == 1.0 and g["weight_decay"] == 0.0
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == sum(1 for p in model.parameters() if p.requires_grad)


def test_class_weights_and_balanced_sampler():
    w = class_weights([0, 0, 0, 1], 3)
    # inverse freq 1/3, 1, absent 0; normalised so present classes average 1 -> 0.5, 1.5
    np.testing.assert_allclose(w.numpy(), [0.5, 1.5, 0.0])
    labels = np.array([0] * 90 + [1] * 10)
    s = balanced_sampler(labels, torch.Generator().manual_seed(0))
    drawn = labels[list(s)]
    assert len(drawn) == 100 and 30 < (drawn == 1).sum() < 70


def test_bad_arguments():
    with pytest.raises(ValueError, match="pool"):
        LinearProbe(tiny_vit(), 2, pool="max")
    with pytest.raises(ValueError, match="class token"):
        LinearProbe(tiny_vit(class_token=False), 2, pool="cls").features(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="blocks"):
        LinearProbe(tiny_vit(depth=2), 2, num_blocks=3)
    with pytest.raises(ValueError, match="VisionTransformer"):
        FineTuneClassifier(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_groups(torch.nn.Linear(2, 2), 1, 1.0, 0.0, layer_decay=0.0)
