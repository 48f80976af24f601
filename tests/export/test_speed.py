"""The ONNX Runtime vs PyTorch timing: interleaved pairs on the same inputs, rendered into a docs block."""

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


def test_docs_block_is_rendered_from_its_record():
    """The block in docs/speed.md is what render makes of docs/export_speed.json, byte for byte."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    record = json.loads((root / "docs" / "export_speed.json").read_text())
    text = (root / "docs" / "speed.md").read_text()
    block = text[text.index(START):text.index(END) + len(END)]
    assert render(record, record["command"]) == block
