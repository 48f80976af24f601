"""3-D MAE pretraining on volume shards with the same recipe and Engine: exact resume after a stop and after a
kill (SIGKILL of `python recipes/pretrain_lumid.py`), and the exported backbone in MONAI's ViT."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import medssl
from medssl.config import load_config
from medssl.pretrain import DEFAULTS, run
from medssl.train.dist import DistInfo
from tests.train.conftest import TINY_3D

ROOT = Path(__file__).resolve().parents[2]


def _cfg(shards, out, *extra):
    return load_config(DEFAULTS, None, [*TINY_3D, f"data.shards={shards}", f"output.dir={out}", *extra])


def _losses(out):
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_3d_resume_after_stop_is_exact_and_backbone_loads_in_monai(toy_volume_shards, tmp_path):
    pytest.importorskip("monai")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(_cfg(toy_volume_shards, straight), DistInfo())
    run(_cfg(toy_volume_shards, split, "train.stop_at=9"), DistInfo())
    assert len(_losses(split)) == 9 and not (split / "backbone").exists()
    run(_cfg(toy_volume_shards, split), DistInfo(), resume=True)
    a, b = _losses(straight), _losses(split)
    assert len(a) == 16 and a == b  # 32 volumes / batch 4 = 8 steps per epoch, 2 epochs
    assert a[16] < a[1]  # it learns
    cfg = json.loads((straight / "backbone" / "config.json").read_text())
    assert cfg["spatial_dims"] == 3 and cfg["img_size"] == [16, 16, 16] and cfg["patch_size"] == 8
    assert cfg["provenance"]["volume"]["crop_size"] == [16, 16, 16]
    vit, ref = medssl.load_backbone(split), medssl.load_backbone(straight / "backbone")
    assert type(vit).__name__ == "ViT" and type(vit).__module__.startswith("monai")
    for (k, v), (_, w) in zip(vit.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k


def test_3d_resume_after_kill_is_exact(toy_volume_shards, tmp_path):
    extra = ["train.epochs=8", "output.ckpt_every=3"]  # 64 steps, a checkpoint every 3
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain_lumid.py"), *TINY_3D,
           f"data.shards={toy_volume_shards}", f"output.dir={killed}", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            ckpts = list((killed / "checkpoints").glob("checkpoint-*.pt")) if (killed / "checkpoints").is_dir() else []
            if ckpts:
                time.sleep(0.3)  # let it run on past the checkpoint: those steps are redone after the resume
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        code = proc.wait()
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "backbone").exists()
    run(_cfg(toy_volume_shards, killed, *extra), DistInfo(), resume=True)
    run(_cfg(toy_volume_shards, straight, *extra), DistInfo())
    assert _losses(killed) == _losses(straight) and len(_losses(straight)) == 64
