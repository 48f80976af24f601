import csv

import pytest
import torch

import medssl
from medssl.config import load_config
from medssl.pretrain import DEFAULTS, run
from medssl.train.dist import DistInfo
from tests.train.conftest import TINY


def _cfg(shards, out, *extra):
    return load_config(DEFAULTS, None, [*TINY, f"data.shards={shards}", f"output.dir={out}", *extra])


def _losses(out):
    with open(out / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_resume_gives_the_same_losses(toy_shards, tmp_path):
    """2N steps straight == N steps, stop, resume, N steps (fp32, CPU): model, optimizer, lr, RNG and data."""
    straight = tmp_path / "straight"
    run(_cfg(toy_shards, straight), DistInfo())
    split = tmp_path / "split"
    run(_cfg(toy_shards, split, "train.stop_at=12"), DistInfo())
    assert len(_losses(split)) == 12
    assert not (split / "backbone").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run(_cfg(toy_shards, split), DistInfo())
    run(_cfg(toy_shards, split), DistInfo(), resume=True)
    a, b = _losses(straight), _losses(split)
    assert len(a) == 24 == len(b)  # 96 samples / batch 8 = 12 steps per epoch, 2 epochs
    assert a == b
    assert a[-1] < a[0]  # it learns
    vit = medssl.load_backbone(split / "backbone")
    ref = medssl.load_backbone(straight)  # a run folder works too
    for (k, v), (_, w) in zip(vit.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k


def test_bad_config_and_data_errors(toy_shards, tmp_path):
    with pytest.raises(KeyError, match="unknown config key 'train.lr_max'"):
        load_config(DEFAULTS, None, ["train.lr_max=3"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(_cfg(tmp_path / "missing-{000..003}.tar", tmp_path / "o1"), DistInfo())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        run(_cfg(empty, tmp_path / "o2"), DistInfo())
    with pytest.raises(ValueError, match="smaller than one patch"):
        run(_cfg(toy_shards, tmp_path / "o3", "data.img_size=4"), DistInfo())
