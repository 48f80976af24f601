"""3-D classification: `VolumeClassifier` on MONAI's ViT (shape, pooling, layer decay, record build / init / save /
load), the 3-D ResNet baseline, and the CNN factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("monai")

from medssl.heads.build import build_head, cnn_model, head_record, init_head, load_head, save_head  # noqa: E402
from medssl.heads.classify import layer_decay_groups  # noqa: E402
from medssl.heads.classify3d import VolumeClassifier, VolumeProbe, resnet3d  # noqa: E402
from medssl.hub import backbone_record, load_backbone, save_backbone  # noqa: E402
from medssl.models.mae import create_mae  # noqa: E402
from medssl.models.monai_vit import build_monai_vit  # noqa: E402

torch.set_num_threads(1)
ARCH = dict(embed_dim=24, depth=2, num_heads=2, patch_size=16, img_size=[32, 32, 32], in_chans=1, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, spatial_dims=3, cls_token=False, embed_dim=24, depth=2,
                     num_heads=2, decoder_depth=1, decoder_embed_dim=16, decoder_num_heads=2)
    return str(save_backbone(mae, tmp_path_factory.mktemp("bb") / "bb"))


def test_output_shape_and_the_pooling_by_hand():
    torch.manual_seed(0)
    model = VolumeClassifier(build_monai_vit(ARCH), 3).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    out = model(x)
    assert out.shape == (2, 3)
    _, hidden = model.backbone(x)  # last block's tokens [2, 8, 24], before the final norm
    assert hidden[-1].shape == (2, 8, 24)
    assert torch.allclose(out, model.head(model.fc_norm(hidden[-1].mean(1))))
    assert float(model.head.weight.detach().std()) < 1e-4 and not model.head.bias.any()  # MAE's head init
    with pytest.raises(ValueError, match="num_classes"):
        VolumeClassifier(build_monai_vit(ARCH), 0)
    with pytest.raises(ValueError, match="3-D medssl backbone"):
        VolumeClassifier(nn.Linear(2, 2), 2)


def test_layer_decay_is_the_2d_rule_on_monai_names():
    model = VolumeClassifier(build_monai_vit(ARCH), 2)
    groups = layer_decay_groups(model, 2, 1.0, 0.05, 0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["backbone.patch_embedding.patch_embeddings.weight"] == 0.5 ** 3  # embeddings: layer 0 of 0..3
    assert scale["backbone.blocks.0.attn.qkv.weight"] == 0.5 ** 2
    assert scale["backbone.blocks.1.mlp.linear1.weight"] == 0.5
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert decay["backbone.patch_embedding.position_embeddings"] == 0.0 and decay["head.weight"] == 0.05


def test_record_build_init_save_load(source, tmp_path):
    rec = head_record("classify", "finetune", source, num_classes=2, img_size=32)
    assert rec["backbone"]["spatial_dims"] == 3
    torch.manual_seed(1)
    model = build_head(rec)
    assert isinstance(model, VolumeClassifier)
    init_head(model, rec)
    pretrained = load_backbone(source)
    for k, v in pretrained.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    x = torch.randn(1, 1, 32, 32, 32)
    save_head(tmp_path / "head.pt", model, rec)
    again, _ = load_head(tmp_path / "head.pt")
    assert torch.equal(again(x), model.eval()(x))
    with pytest.raises(ValueError, match="classify heads here"):  # 3-D segmentation is UNETR (segment3d)
        build_head(head_record("segment", "finetune", backbone_record(source), num_classes=2, img_size=32))


def test_cnn_baselines():
    torch.manual_seed(0)
    net = resnet3d(3)
    assert net(torch.randn(2, 1, 32, 32, 32)).shape == (2, 3)
    assert type(cnn_model("classify", 3, spatial_dims=3)).__name__ == "ResNet"
    unet = cnn_model("segment", 2, spatial_dims=3, unet_base=4, unet_levels=2)
    assert unet(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="kind must be"):
        cnn_model("detect", 2)


def test_3d_cnn_baselines_normalise_each_volume_alone():
    """A batch holds two volumes: the 3-D baselines normalise per sample (GroupNorm in the ResNet, affine
    InstanceNorm3d in the U-Net; no BatchNorm), so in training mode a volume's output does not depend on the volume
    beside it; the 2-D U-Net keeps BatchNorm."""
    torch.manual_seed(0)
    for net, x, kind in ((resnet3d(2), torch.randn(2, 1, 32, 32, 32), torch.nn.GroupNorm),
                         (cnn_model("segment", 2, spatial_dims=3, unet_base=4, unet_levels=2),
                          torch.randn(2, 1, 16, 16, 16), torch.nn.InstanceNorm3d)):
        norms = [m for m in net.modules() if "Norm" in type(m).__name__]
        assert len(norms) > 4 and all(isinstance(m, kind) and m.affine for m in norms)
        net.train()
        torch.testing.assert_close(net(x)[:1], net(x[:1]), rtol=1e-5, atol=1e-5)
    unet2d = cnn_model("segment", 2, unet_base=4, unet_levels=2)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unet2d.modules())


def test_volume_probe_features_by_hand_and_frozen():
    torch.manual_seed(0)
    probe = build_head(head_record("classify", "probe", {**ARCH, "spatial_dims": 3}, num_classes=2, img_size=32,
                                   probe_blocks=2))
    assert isinstance(probe, VolumeProbe) and probe.indices == [0, 1] and probe.pool == "mean"
    x = torch.randn(3, 1, 32, 32, 32)
    last, hidden = probe.backbone(x)
    inner = torch.nn.functional.layer_norm(hidden[0], (24,), eps=1e-6).mean(1)
    assert torch.allclose(probe.features(x), torch.cat([inner, last.mean(1)], 1))  # [3, 48]
    assert probe(x).shape == (3, 2)
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    assert not probe.train().backbone.training  # the encoder stays in eval mode
