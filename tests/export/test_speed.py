"""The ONNX Runtime vs PyTorch timing: interleaved pairs on the same inputs, rendered into a README block."""

from __future__ import annotations

import pytest

from medssl.export.sources import load_exportable
from medssl.export.speed import END, START, measure, render

pytest.importorskip("onnxruntime")


def test_measure_and_render(tiny_backbone, tmp_path):
    row = measure(load_exportable(tiny_backbone), batch=2, rounds=3, threads=1, workdir=tmp_path)
    assert row["input"] == [2, 1, 32, 32] and row["rounds"] == 3
    assert row["torch_ms"] > 0 and row["onnxruntime_ms"] > 0
    assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    block = render({"rows": [row], "date": "D", "cpu": "C", "cpus": 2, "torch": "T", "onnxruntime": "O",
                    "commit": "abc"}, "python -m medssl.export.speed")
    assert block.startswith(START) and block.endswith(END)
    assert f"| {row['torch_ms']:.1f} | {row['onnxruntime_ms']:.1f} | {row['ratio_median']:.2f}x" in block
