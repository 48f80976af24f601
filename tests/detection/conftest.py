"""A tiny generated mammography set and a tiny MedMask config shared by the detection tests."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = ["model.backbone_name=resnet10t", "model.hidden_dim=64", "model.nheads=2", "model.enc_layers=1",
        "model.dec_layers=1", "model.dim_feedforward=64", "model.num_queries=8", "data.max_size=64",
        "data.sizes=[64]", "data.batch_size=2", "mae.layers=1", "distill.proj_dim=16",
        "source_only.epochs=1", "cross_domain_mae.epochs=1", "teaching.epochs=2", "teaching.retrain_every=1",
        "teaching.score_threshold=0.0", "teaching.mae_epochs=1"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from data_tools import make_demo

    root = tmp_path_factory.mktemp("mammo")
    make_demo.main(["mammo", "--out", str(root), "--train", "4", "--val", "3", "--test", "1", "--target", "3",
                    "--height", "64", "--width", "64", "--abnormal-frac", "0.7", "--expert", "vit_tiny_patch16",
                    "--embed-size", "32",
                    "--embed-grid", "2"])
    return root
