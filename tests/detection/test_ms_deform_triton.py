"""The Triton kernels of multi-scale deformable attention, run on CPU through Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_triton_kernels_match_reference_under_interpreter():
    """Forward vs the per-point loop, gradients vs grid_sample autograd, in float64 (see triton_interp_check.py)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_interp_check.py"))],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forward and gradients match" in proc.stdout


def test_triton_path_refuses_cpu_tensors_without_interpreter(monkeypatch):
    """Outside the interpreter the Triton path is for CUDA tensors only, and says so."""
    import torch

    from medssl.detection.deformable_attn import ms_deform_attn

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    v, shapes, loc = torch.randn(1, 5, 1, 2), torch.tensor([[1, 5]]), torch.rand(1, 2, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="CUDA"):
        ms_deform_attn(v, shapes, loc, torch.ones(1, 2, 1, 1, 1), impl="triton")
