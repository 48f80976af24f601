"""ONNX Runtime vs PyTorch eager on CPU: a backbone's forward and the detector's predict, same inputs.

    python -m medssl.export.speed --json docs/export_speed.json --readme docs/speed.md

Both run the same exported graph module (normalisation included; the detector with top-k and box decoding):
PyTorch eager as medssl trains it (the detector with its training deformable-attention op), ONNX Runtime on
the ONNX file exported from it. Calls are interleaved (PyTorch, ONNX Runtime, PyTorch, ...) so that the
machine's drifts hit both alike; each pair gives a ratio (PyTorch time / ONNX Runtime time, > 1: ONNX
Runtime faster), reported as the median pair with the range.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medssl.export.onnx import export_onnx, onnx_session
from medssl.export.sources import Exportable, load_exportable

__all__ = ["demo_detector_exportable", "measure", "render", "run"]

START, END = "<!-- export-speed:start -->", "<!-- export-speed:end -->"


def demo_detector_exportable(size: int = 192, top_k: int = 100) -> Exportable:
    """The CPU demo's detector (`recipes/configs/medmask_demo.yaml` model, random weights) at `size` px."""
    import yaml

    from medssl.detection.deformable_attn import set_attn_impl
    from medssl.detection.detr import DetrConfig, build_detector
    from medssl.export.graphs import DetectorGraph

    cfg_file = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "medmask_demo.yaml"
    model_cfg = yaml.safe_load(cfg_file.read_text())["model"] if cfg_file.is_file() else {}
    torch.manual_seed(0)
    det = build_detector(DetrConfig.from_dict({**model_cfg, "in_chans": 1})).eval()
    set_attn_impl(det, "export")  # as load_exportable does for a checkpoint
    graph = DetectorGraph(det, [0.5], [0.25], top_k).eval()
    return Exportable("detector", graph, ["images", "mask"], ["scores", "labels", "boxes", "index"], 1, (size, size),
                      True, 32, "demo detector config (random weights)",
                      {"mean": [0.5], "std": [0.25], "top_k": top_k, "resize": {"max_size": size, "sizes": None},
                       "detector": model_cfg})


def measure(exp: Exportable, batch: int, rounds: int, threads: int, workdir: Path) -> dict[str, Any]:
    """Export `exp`, then time PyTorch eager and ONNX Runtime alternately on the same input."""
    from medssl.detection.deformable_attn import set_attn_impl

    path = export_onnx(exp, workdir / exp.kind)
    if exp.kind == "detector":
        set_attn_impl(exp.graph, "auto")  # PyTorch as it trains: the fused op (the export form was for the graph)
    session = onnx_session(path, threads)
    inputs = exp.probe(batch, seed=0)
    feeds = {n: t.numpy() for n, t in zip(exp.input_names, inputs)}
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    with torch.no_grad():
        for i in range(rounds + 2):  # two warm-up rounds
            t0 = time.perf_counter()
            exp.graph(*inputs)
            t1 = time.perf_counter()
            session.run(None, feeds)
            t2 = time.perf_counter()
            if i >= 2:
                times["torch"].append(t1 - t0)
                times["onnxruntime"].append(t2 - t1)
    ratios = [a / b for a, b in zip(times["torch"], times["onnxruntime"])]
    return {"model": exp.source, "kind": exp.kind, "input": list(inputs[0].shape), "rounds": rounds,
            "threads": threads, "torch_ms": 1e3 * statistics.median(times["torch"]),
            "onnxruntime_ms": 1e3 * statistics.median(times["onnxruntime"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(backbone: str, img_size: int, det_size: int, batch: int, rounds: int, threads: int) -> dict[str, Any]:
    """Measure the backbone forward and the demo detector's predict; returns the JSON record."""
    import onnxruntime

    from medssl.export.card import git_commit

    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(load_exportable(backbone, size=(img_size, img_size)), batch, rounds, threads, Path(tmp)),
                measure(demo_detector_exportable(det_size), 1, rounds, threads, Path(tmp))]
    return {"rows": rows, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"),
            "cpu": _cpu(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "commit": git_commit()}


def render(result: dict[str, Any], command: str) -> str:
    """The docs block (between the export-speed markers of docs/speed.md)."""
    lines = [START, "", "ONNX Runtime vs PyTorch eager on CPU (`medssl/export/speed.py`): the same exported module "
             "and inputs, calls interleaved; ratio = PyTorch time / ONNX Runtime time per pair (> 1: ONNX Runtime "
             "faster), median [min, max] over the pairs.", "",
             "| model | input | threads | PyTorch ms | ONNX Runtime ms | ratio |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        what = "backbone forward" if r["kind"] == "backbone" else "detector predict (graph incl. top-k)"
        lines.append(f"| {r['model']}: {what} | {'x'.join(map(str, r['input']))} | {r['threads']} | "
                     f"{r['torch_ms']:.1f} | {r['onnxruntime_ms']:.1f} | {r['ratio_median']:.2f}x "
                     f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}], {r['rounds']} pairs |")
    lines += ["", f"Measured {result['date']} on {result['cpu']}, {result['cpus']} CPUs (shared with other jobs), "
              f"torch {result['torch']}, onnxruntime {result['onnxruntime']}, commit {result['commit']}, by "
              f"`{command}`.", "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line; prints the docs block."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--det-size", type=int, default=192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the measurement here")
    p.add_argument("--readme", help="replace the block between the export-speed markers in this file "
                                    "(docs/speed.md)")
    a = p.parse_args(argv)
    result = run(a.backbone, a.img_size, a.det_size, a.batch, a.rounds, a.threads)
    command = "python -m medssl.export.speed " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    block = render(result, command.strip())
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({**result, "command": command.strip()}, indent=1))
    if a.readme:
        text = Path(a.readme).read_text()
        if START not in text or END not in text:
            raise ValueError(f"{a.readme}: no {START} ... {END} block to replace")
        Path(a.readme).write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text,
                                         flags=re.S))
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
