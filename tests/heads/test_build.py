"""Transfer models from a record: a backbone source or an architecture record, a given backbone."""

import pytest
import torch

from medssl.heads.build import build_head, head_record, init_head
from medssl.hub import backbone_record, build_backbone_model, save_backbone
from medssl.models.vit import build_vit

torch.set_num_threads(1)


def test_head_record_from_an_architecture_record(tmp_path):
    torch.manual_seed(0)
    save_backbone(build_vit(32, 2, 2, 8, 32, 1), tmp_path / "bb")
    arch = backbone_record(tmp_path / "bb")
    from_source = head_record("segment", "finetune", tmp_path / "bb", 2, 32, blocks=2, decoder_dim=16)
    from_record = head_record("segment", "finetune", arch, 2, 32, blocks=2, decoder_dim=16)
    assert from_record["backbone"] == from_source["backbone"] and from_record["backbone_source"] is None
    torch.manual_seed(1)
    a = build_head(from_source)
    torch.manual_seed(1)
    b = build_head(from_record)
    assert init_head(b, from_record) == arch["where"]  # nothing to load: the backbone stays as built
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)
    init_head(a, from_source)  # the pretrained weights
    assert not torch.equal(a.backbone.pos_embed, b.backbone.pos_embed)


def test_build_head_on_a_given_backbone():
    rec = head_record("classify", "probe", "vit_tiny_patch16", 2, 32, pool="mean", probe_blocks=2)
    vit = build_backbone_model(rec["backbone"], img_size=32, in_chans=1)
    model = build_head(rec, vit)
    assert model.backbone is vit and model.indices == [10, 11] and model.pool == "mean"
    with pytest.raises(ValueError, match="not the record's"):
        build_head(rec, build_vit(32, 2, 2, 8, 32, 1))
