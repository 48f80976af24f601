"""Segmentation heads: shapes over patch sizes / channels / sizes, frozen probe, Dice + CE loss."""

import pytest
import torch

from medssl.heads.segment import DenseProbe, UNet, ViTSegmenter, dice_ce_loss

from ._vit import tiny_vit

torch.set_num_threads(1)


@pytest.mark.parametrize("patch,in_chans,size", [(4, 1, (32, 32)), (8, 3, (32, 48)), (16, 1, (32, 32)),
                                                 (6, 1, (36, 24))])
def test_vit_segmenter_shapes_and_grad(patch, in_chans, size):
    vit = tiny_vit(img_size=size, patch_size=patch, in_chans=in_chans, depth=4)
    model = ViTSegmenter(vit, 3, blocks=3, decoder_dim=32)
    x = torch.randn(2, in_chans, *size)
    y = model(x)
    assert y.shape == (2, 3, *size)
    y.mean().backward()
    assert vit.patch_embed.proj.weight.grad is not None


def test_frozen_segmenter_and_dense_probe():
    vit = tiny_vit(depth=4)
    seg = ViTSegmenter(vit, 2, blocks=[1, 3], freeze_backbone=True, image_skip=False)
    seg.train()
    assert not seg.backbone.training
    seg(torch.randn(2, 1, 32, 32)).sum().backward()
    assert vit.patch_embed.proj.weight.grad is None
    probe = DenseProbe(tiny_vit(depth=4), 4, num_blocks=2)
    f = probe.features(torch.randn(2, 1, 32, 32))
    assert f.shape == (2, 48, 8, 8)
    assert probe(torch.randn(2, 1, 32, 32)).shape == (2, 4, 32, 32)


def test_unet_shapes_and_bad_size():
    net = UNet(1, 3, base=8, levels=3)
    assert net(torch.randn(2, 1, 32, 24)).shape == (2, 3, 32, 24)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 30, 32))


def test_dice_ce_loss_hand_case():
    # 1 image, 2 classes, 2 pixels: target [0, 1]; logits give probs p1 = [0.25, 0.75]
    lg = torch.log(torch.tensor([[0.75, 0.25], [0.25, 0.75]]))  # [C, pixels]
    logits = lg.reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    ce = -torch.log(torch.tensor(0.75))
    # class 0: inter 0.75, denom (0.75+0.25) + 1 -> dice 1.5/2 ; class 1 same
    expected = ce + (1 - 0.75)
    torch.testing.assert_close(dice_ce_loss(logits, target, eps=0.0), expected)
    perfect = torch.tensor([[[[20.0, -20.0]], [[-20.0, 20.0]]]])
    assert dice_ce_loss(perfect, target).item() < 1e-4


def test_dice_ce_ignore_and_bad_shapes():
    logits = torch.zeros(1, 2, 1, 2)
    tgt = torch.tensor([[[1, -100]]])
    assert torch.isfinite(dice_ce_loss(logits, tgt))
    with pytest.raises(ValueError, match="logits"):
        dice_ce_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="num_classes"):
        ViTSegmenter(tiny_vit(), 0)


def test_unet_in_3d_and_its_ill_arguments():
    net = UNet(1, 3, base=4, levels=2, spatial_dims=3)
    assert net(torch.zeros(1, 1, 8, 8, 12)).shape == (1, 3, 8, 8, 12)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        UNet(1, 3, spatial_dims=1)
    with pytest.raises(ValueError, match=r"\(3-D\) input \(1, 1, 8, 8\)"):
        net(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 1, 8, 8, 6))
