"""Deformable DETR assembly: shapes, reference initialisation, options, frozen backbone, post-processing."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.detection.criterion import SetCriterion
from medssl.detection.detr import DetrConfig, build_detector, demo_detector_config, postprocess

TARGETS = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.1]])},
           {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]


def _batch():
    x = torch.randn(2, 1, 96, 64)
    mask = torch.zeros(2, 96, 64, dtype=torch.bool)
    mask[1, :, 32:] = True  # second image is half padding
    return x, mask


@pytest.mark.parametrize("kw", [{}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True}])
def test_forward_backward_options(kw):
    torch.manual_seed(0)
    model = build_detector(demo_detector_config(num_queries=12, **kw))
    x, mask = _batch()
    out = model(x, mask)
    assert out["pred_logits"].shape == (2, 12, 1) and out["pred_boxes"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == 1 and out["hs"].shape == (2, 12, 64)
    assert ("enc_outputs" in out) == bool(kw.get("two_stage"))
    losses = SetCriterion(1)(out, TARGETS)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)


def test_reference_initialisation_and_frozen_stem():
    model = build_detector(demo_detector_config(backbone_freeze=True))
    bias = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(model.class_embed[0].bias, torch.full((1,), bias))
    last = model.bbox_embed[0].layers[-1]
    assert last.weight.abs().sum() == 0 and last.bias[:2].abs().sum() == 0
    assert model.class_embed[0] is model.class_embed[1]  # shared heads without box refinement
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert any(n.startswith("body.layer1.") for n in frozen) and any("conv1" in n for n in frozen)
    assert not any(n.startswith("body.layer2.") for n in frozen)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())  # frozen BN
    scratch = build_detector(demo_detector_config())  # no weights: trains fully, live BatchNorm
    assert all(p.requires_grad for p in scratch.backbone.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scratch.backbone.modules())


def test_vit_backbone_plugs_in():
    torch.manual_seed(0)
    model = build_detector(demo_detector_config(backbone="vit", backbone_name="vit_tiny_patch16", img_size=64,
                                                num_queries=8))
    x, mask = _batch()
    out = model(x, mask)
    assert out["pred_boxes"].shape == (2, 8, 4)
    assert [f.shape[-1] for f in out["features"]["backbone"]] == [8, 4, 2]  # strides 8, 16, 32


@pytest.mark.parametrize("patch", [4, 8, 14, 16])
def test_vit_pyramid_strides_by_hand(patch, tmp_path):
    import medssl
    from medssl.detection.backbone import ViTPyramidBackbone
    from medssl.models.vit import build_vit

    torch.manual_seed(0)
    h, w = (64, 96) if patch != 14 else (56, 112)
    medssl.save_backbone(build_vit(32, 2, 2, patch, h, 1), tmp_path / "vit")  # a small ViT of that patch size
    from medssl.hub import backbone_record

    bb = ViTPyramidBackbone(backbone_record(tmp_path / "vit"), in_chans=1, img_size=h)
    want_strides = [8, 16, 32] if patch != 14 else [7, 14, 28]  # ResNet strides, or p/2, p, 2p for p = 14
    assert bb.strides == want_strides
    x = torch.rand(2, 1, h, w)
    maps = bb(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(h // s, w // s) for s in want_strides]
    (fmap,) = bb.vit(x)  # [2, D, h / p, w / p]
    d = fmap.shape[1]
    for m, s in zip(maps, want_strides):
        if s > patch:  # coarser levels: max over (s / p) x (s / p) blocks of the patch map, by hand
            f = s // patch
            want = fmap.reshape(2, d, h // s, f, w // s, f).amax(dim=(3, 5))
            torch.testing.assert_close(m, want)
        elif s == patch:
            torch.testing.assert_close(m, fmap)
        else:
            assert m.shape[1] == d // 2  # transposed conv to half the width


def test_frozen_vit_backbone_keeps_its_weights():
    torch.manual_seed(0)
    model = build_detector(demo_detector_config(backbone="vit", backbone_name="vit_tiny_patch16", img_size=64,
                                                num_queries=4, backbone_freeze=True))  # stride 8 = a trained up-conv
    vit, pyramid = model.backbone.vit, model.backbone.levels
    assert not any(p.requires_grad for p in vit.parameters()) and any(p.requires_grad for p in pyramid.parameters())
    model.train()
    assert not vit.training and model.backbone.training
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, mask = _batch()
    out = model(x, mask)
    (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_bad_config_raises():
    with pytest.raises(ValueError, match="unknown detector config keys"):
        build_detector({"hidden": 64})
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detector(DetrConfig(backbone_name="resnet18", hidden_dim=48, nheads=4))
    with pytest.raises(ValueError, match="backbone kind"):
        build_detector(DetrConfig(backbone="vgg"))


def test_postprocess_hand_case():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, -3.0]]])  # 2 queries x 2 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]]])
    (res,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]), top_k=2)
    torch.testing.assert_close(res["scores"], torch.tensor([2.0, 0.0]).sigmoid())
    assert res["labels"].tolist() == [1, 0]
    torch.testing.assert_close(res["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0]] * 2))


def test_saved_medssl_backbone_plugs_into_the_detector(tmp_path):
    import medssl

    torch.manual_seed(0)
    vit = medssl.load_backbone("vit_tiny_patch16", img_size=64, in_chans=1)
    with torch.no_grad():
        vit.blocks[0].attn.qkv.weight.mul_(1.5)  # something a random init would not reproduce
    medssl.save_backbone(vit, tmp_path / "backbone", data="unit test")
    model = build_detector(demo_detector_config(backbone="vit", backbone_name=str(tmp_path / "backbone"),
                                                img_size=64, num_queries=4))
    assert not torch.equal(model.backbone.vit.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert model.load_pretrained() == str(tmp_path / "backbone")  # the explicit init step
    torch.testing.assert_close(model.backbone.vit.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    x, mask = _batch()
    assert model(x, mask)["pred_boxes"].shape == (2, 4, 4)


def test_resnet_local_weights_load_and_freeze(tmp_path):
    import timm

    from medssl.detection.backbone import ResNetBackbone

    src = timm.create_model("resnet10t", pretrained=False, in_chans=1)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "r10t.pth")  # classifier keys are dropped
    bb = ResNetBackbone("resnet10t", in_chans=1, freeze=True)
    bb.load_pretrained(tmp_path / "r10t.pth")
    torch.testing.assert_close(bb.body.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    assert bb.frozen and not any(p.requires_grad for n, p in bb.body.named_parameters() if n.startswith("layer1."))
    torch.save({"fc.weight": torch.zeros(3), "layer4.0.conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="do not fit"):
        bb.load_pretrained(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        bb.load_pretrained(tmp_path / "missing.pth")


def test_spark_pretrained_resnet_folder_initialises_the_detector(tmp_path):
    """`backbone_weights` may name a SparK backbone folder: the detector's ResNet gets exactly those weights."""
    import medssl
    from medssl.models.spark import create_spark

    torch.manual_seed(0)
    spark = create_spark("spark_resnet18", img_size=64, in_chans=1, mask_patch=16, decoder_dim=32)
    with torch.no_grad():
        spark.encoder.layer4[0].conv1.weight.mul_(1.5)  # something a random init would not reproduce
    spark(torch.rand(2, 1, 64, 64))  # one pass: BN running statistics off their initial values
    folder = medssl.save_backbone(spark, tmp_path / "backbone", data="unit test")
    cfg = demo_detector_config(backbone_name="resnet18", backbone_weights=str(folder), num_queries=4)
    model = build_detector(cfg)
    assert model.backbone.frozen  # weights given: the reference's frozen BN + stem + layer1
    assert model.load_pretrained() == str(folder)
    encoder, body = spark.encoder_state_dict(), model.backbone.body.state_dict()
    # every body key loaded: the encoder's keys less the BN step counters, which the frozen BN does not keep
    assert set(body) == {k for k in encoder if not k.endswith(".num_batches_tracked")}
    for k, w in body.items():
        torch.testing.assert_close(w, encoder[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(model.backbone.body.layer4[0].conv1.weight, spark.encoder.layer4[0].conv1.weight)
    x, mask = _batch()
    assert model(x, mask)["pred_boxes"].shape == (2, 4, 4)
    wrong = build_detector(demo_detector_config(backbone_name="resnet10t", backbone_weights=str(folder)))
    with pytest.raises(ValueError, match="resnet18"):
        wrong.load_pretrained()
