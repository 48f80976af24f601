"""A small backbone folder and a fine-tuned classifier checkpoint shared by the export tests."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import medssl
from medssl.heads.build import build_head, head_record, save_head


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    return medssl.save_backbone(vit, tmp_path_factory.mktemp("bb") / "backbone", data="random test weights",
                                mean=[0.4], std=[0.2])


@pytest.fixture(scope="session")
def classifier_ckpt(tiny_backbone, tmp_path_factory):
    """A 3-class fine-tuned classifier (a few AdamW steps, so the head is off its near-zero initialisation)."""
    rec = head_record("classify", "finetune", tiny_backbone, num_classes=3, img_size=32)
    model = build_head(rec)
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.rand(8, 1, 32, 32), torch.randint(0, 3, (8,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_head(tmp_path_factory.mktemp("head") / "head.pt", model.eval(), rec, classes=["a", "b", "c"],
                     metrics={"accuracy": 0.5})
