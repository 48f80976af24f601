"""MedMask on the one engine: 2-process torchrun / DeepSpeed ZeRO-2 stages, SIGKILL + --resume equality,
and a detector checkpoint that predicts after the backbone it was trained from is gone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.detection.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "medmask_detect.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    sets = [x for s in [*TINY, *extra] for x in ("--set", s)]
    return ["--dataset", "demo", "--data-root", str(root), "--config", str(ROOT / "recipes/configs/medmask_demo.yaml"),
            "--out", str(out), *sets]


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def _check_two_ranks(out: Path) -> None:
    m = json.loads((out / "source_only" / "metrics.json").read_text())
    # 4 labelled images, 2 per rank, batch 2 per rank: one step per epoch (one process would take two)
    assert (m["world_size"], m["global_batch"], m["steps_per_epoch"]) == (2, 4, 1)
    assert m["complete"] and m["best"]["num_images"] == 3  # validation gathered over the whole split
    assert (out / "source_only" / "best.pt").is_file() and (out / "source_only" / "checkpoints").is_dir()


def test_stage_under_torchrun_two_processes(tiny_root, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    _run([torchrun, "--nproc_per_node", "2", "--master_port", str(_port()), RECIPE, "--stage", "source_only",
          *_args(tiny_root, out)])
    _check_two_ranks(out)


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_stage_under_deepspeed_zero2_two_processes(tiny_root, tmp_path):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    out = tmp_path / "ds"
    _run([launcher, "--num_accelerators", "2", "--master_port", str(_port()), RECIPE, "--deepspeed",
          "--deepspeed_config", str(ROOT / "recipes" / "configs" / "ds_zero2.json"), "--stage", "source_only",
          *_args(tiny_root, out)])
    _check_two_ranks(out)


def _final(out: Path) -> tuple[dict, dict]:
    summary = json.loads((out / "summary.json").read_text())
    return torch.load(out / "teaching" / "last.pt", weights_only=True)["model"], summary["test"]


def test_sigkill_in_a_stage_then_resume_equals_an_uninterrupted_run(tiny_root, tmp_path):
    """Killed (SIGKILL) after the first checkpoint of `teaching`, resumed with --resume: same weights, same test."""
    straight = tmp_path / "straight"
    _run([sys.executable, RECIPE, *_args(tiny_root, straight)])
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, RECIPE, *_args(tiny_root, killed)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "teaching" / "checkpoints" / "checkpoint-00000002.pt"  # the end of teaching's first epoch
    deadline = time.time() + 600
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file() and not (killed / "teaching" / "metrics.json").is_file()  # killed inside the stage
    _run([sys.executable, RECIPE, *_args(tiny_root, killed), "--resume"])
    (w1, t1), (w2, t2) = _final(straight), _final(killed)
    assert set(w1) == set(w2)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    assert t1 == t2
    for stage in ("source_only", "cross_domain_mae", "teaching"):
        h1 = json.loads((straight / stage / "metrics.json").read_text())["history"]
        h2 = json.loads((killed / stage / "metrics.json").read_text())["history"]
        assert [h["val"] for h in h1] == [h["val"] for h in h2]


def test_detector_predicts_after_its_backbone_folder_is_gone(tiny_root, tmp_path):
    import medssl
    from medssl.config import load_config
    from medssl.detection.config import DEFAULTS
    from medssl.detection.predict import predict_files
    from medssl.detection.stages import train_stage
    from medssl.models.vit import build_vit

    torch.manual_seed(0)
    folder = tmp_path / "backbone"
    medssl.save_backbone(build_vit(32, 2, 2, 8, 64, 1), folder, data="unit test")
    sets = [f"data.data_root={tiny_root}", f"out={tmp_path / 'run'}", *TINY, "model.backbone=vit",
            f"model.backbone_name={folder}", "model.img_size=64", "data.embeddings=null"]
    cfg = load_config(DEFAULTS, ROOT / "recipes/configs/medmask_demo.yaml", sets)
    res = train_stage("source_only", cfg, tmp_path / "run")
    ck = torch.load(res["checkpoint"], weights_only=True)
    assert ck["detector"]["backbone_arch"]["embed_dim"] == 32  # the architecture record travels with it
    images = [tiny_root / "demo" / "images" / "test"]
    before = predict_files(res["checkpoint"], images, tmp_path / "p1")
    shutil.rmtree(folder)
    after = predict_files(res["checkpoint"], images, tmp_path / "p2")
    def timeless(preds):  # "seconds" is wall time: it differs between two runs by nature
        return [{k: v for k, v in p.items() if k != "seconds"} for p in preds]

    assert timeless(before) == timeless(after) and len(before[0]["boxes"]) > 0
