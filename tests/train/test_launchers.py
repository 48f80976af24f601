"""The same recipe under torchrun (DDP, gloo) and the deepspeed launcher (ZeRO-2), 2 processes on CPU."""

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medssl
from tests.train.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "pretrain_lumid.py")
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _args(shards, out, *extra):
    return [*TINY, f"data.shards={shards}", f"output.dir={out}", "train.steps=4", *extra]


def test_torchrun_two_processes(toy_shards, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    _run([torchrun, "--nproc_per_node", "2", "--master_port", str(_port()), RECIPE, *_args(toy_shards, out)])
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    vit = medssl.load_backbone(out)
    assert vit.forward_features(torch.zeros(1, 1, 32, 32)).shape == (1, 17, 192)


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_two_processes_zero2_resume(toy_shards, tmp_path):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    out = tmp_path / "ds"
    base = [launcher, "--num_accelerators", "2", "--master_port", str(_port()), RECIPE, "--deepspeed",
            "--deepspeed_config", str(ROOT / "recipes" / "configs" / "ds_zero2.json")]
    _run([*base, *_args(toy_shards, out, "train.stop_at=2")])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    base[4] = str(_port())
    _run([*base, *_args(toy_shards, out), "--resume"])
    assert [int(r["step"]) for r in _rows(out)] == [1, 2, 3, 4]
    # exported from the fp32 master weights, not the bf16 copies DeepSpeed trains the module in
    from safetensors.torch import load_file

    w = load_file(str(out / "backbone" / "model.safetensors"))["blocks.0.attn.qkv.weight"]
    assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())
    vit = medssl.load_backbone(out / "backbone")
    assert vit.forward_features(torch.zeros(1, 1, 32, 32)).shape == (1, 17, 192)


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_flag_under_plain_python(toy_shards, tmp_path):
    """A single `python` process with --deepspeed needs no MPI (env defaults are filled in)."""
    out = tmp_path / "ds1"
    env_clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, RECIPE, "--deepspeed", "--deepspeed_config",
                           str(ROOT / "recipes" / "configs" / "ds_zero1.json"), *_args(toy_shards, out)],
                          cwd=ROOT, env={**env_clean, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(_rows(out)) == 4 and (out / "backbone" / "model.safetensors").is_file()
