"""The two transfer recipes run end to end on tiny PNG data sets with a tiny saved backbone."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.hub import save_backbone
from medssl.models.vit import build_vit
from medssl.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _run(script, args):
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(ROOT / "recipes" / script), run_name="__main__")
        assert exc.value.code == 0
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bb") / "backbone"
    torch.manual_seed(0)
    save_backbone(build_vit(32, 2, 2, 8, 32, 1), folder)
    return folder


def test_finetune_classify_recipe(tmp_path, backbone):
    rng = np.random.default_rng(0)
    rows = ["path,label,patient"]
    for i in range(24):
        label = i % 2
        img = rng.integers(0, 80, (32, 32)) + (120 if label else 0)
        Image.fromarray(img.astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'tumour' if label else 'normal'},P{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    out = tmp_path / "run"
    _run("finetune_classify.py", [f"data.source={tmp_path / 'labels.csv'}", f"model.backbone={backbone}",
                                  "data.img_size=32", "train.epochs=2", "train.batch_size=8",
                                  "train.warmup_epochs=0", "train.device=cpu", f"output.dir={out}"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["normal", "tumour"] and 0 <= m["test"]["auc"] <= 1
    assert sum(m["samples"].values()) == 24
    assert "fc_norm.weight" in load_checkpoint(out / "head.pt")["model"]


def test_finetune_segment_recipe(tmp_path, backbone):
    rows = ["image,mask"]
    for i in range(6):
        img = np.zeros((32, 32), np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        img[4 + i:20 + i, 6:22] = 200
        mask[4 + i:20 + i, 6:22] = 1
        Image.fromarray(img).save(tmp_path / f"i{i}.png")
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        rows.append(f"i{i}.png,m{i}.png")
    (tmp_path / "pairs.csv").write_text("\n".join(rows))
    out = tmp_path / "run"
    _run("finetune_segment.py", [f"data.csv={tmp_path / 'pairs.csv'}", f"model.backbone={backbone}",
                                 "data.img_size=32", "model.decoder_dim=16", "model.blocks=2", "train.epochs=2",
                                 "train.batch_size=4", "train.warmup_epochs=0", "train.device=cpu",
                                 f"output.dir={out}"])
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["test"]["dice"] <= 1 and m["samples"] == {"train": 4, "val": 1, "test": 1}


def test_recipe_needs_data(tmp_path, backbone):
    with pytest.raises(ValueError, match="data.source"):
        _run("finetune_classify.py", [f"output.dir={tmp_path}"])
