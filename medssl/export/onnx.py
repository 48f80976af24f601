"""ONNX export with a parity check in ONNX Runtime right after it.

`export_onnx` writes `model.onnx` (opset 18, dynamic batch and H/W, or fixed H/W with `static`) and
`medssl_export.json` beside it: inputs, outputs, what the graph does to them
(normalisation, top-k, box decoding), what the runner must do (resize, pad, mask), and the parity result.
The export fails (`ParityError`) when ONNX Runtime and PyTorch differ by more than the tolerance.

Tolerance: float32 rounding is 6e-8 relative per operation; the two runtimes order the sums of matmuls,
LayerNorm and softmax differently, so a dot product of length K can differ by about sqrt(K) * 6e-8 of its
magnitude (K = 3072 in a ViT-B MLP: 3e-6), and that compounds over the depth (a ViT-B has 24 matmul stages
between normalisations). 1e-4 of the output scale (max |PyTorch output|, at least 1) leaves a 3-10x margin
over that estimate for ViT-B (an estimate, not a measurement on ViT-B). Measured: 2-3e-6 for a 12-block
ViT-Ti, 1-4e-7 for the tests' 2-block ViT and small detectors; the same graph checked against other
weights fails (tests/export/test_onnx.py).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.export.sources import Exportable

__all__ = ["DEFAULT_RTOL", "META_NAME", "OPSET", "ParityError", "export_onnx", "onnx_session", "parity"]

OPSET = 18
DEFAULT_RTOL = 1e-4
META_NAME = "medssl_export.json"


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"ONNX export needs the '{module}' package: pip install 'medssl[export]'") from err


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for `path` (`threads` intra-op threads; default: ONNX Runtime's)."""
    ort = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_torch(exp: Exportable, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = exp.graph(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def _compare_detections(ort_out: list[np.ndarray], ref: list[np.ndarray], tol: float) -> float:
    """Max difference of scores and boxes between two top-k lists, matched by (query, class) index.

    A detection may be in only one list when its score lies within `tol` of the k-th score (a tie at the
    cut that the two runtimes may break differently); otherwise a missing one is infinite difference.
    """
    worst = 0.0
    for b in range(ref[0].shape[0]):
        r = {int(i): (s, box) for s, box, i in zip(ref[0][b], ref[2][b], ref[3][b])}
        o = {int(i): (s, box) for s, box, i in zip(ort_out[0][b], ort_out[2][b], ort_out[3][b])}
        cut = min(float(ref[0][b].min()), float(ort_out[0][b].min())) if len(r) else 0.0
        for i in set(r) | set(o):
            if i in r and i in o:
                worst = max(worst, abs(float(r[i][0]) - float(o[i][0])), float(np.abs(r[i][1] - o[i][1]).max()))
            elif abs(float((r.get(i) or o.get(i))[0]) - cut) > tol:
                return float("inf")
        worst = max(worst, float(np.abs(np.sort(ref[0][b]) - np.sort(ort_out[0][b])).max()))
    return worst


def parity(session: Any, exp: Exportable, inputs: tuple[torch.Tensor, ...], rtol: float = DEFAULT_RTOL
           ) -> dict[str, Any]:
    """Run `inputs` through ONNX Runtime and PyTorch; returns shapes, max abs difference, tolerance, ok."""
    feeds = {name: t.numpy() for name, t in zip(exp.input_names, inputs)}
    ort_out = session.run(exp.output_names, feeds)
    ref = _run_torch(exp, inputs)
    if not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in (*ort_out, *ref)):
        return {"input_shape": list(inputs[0].shape), "max_abs_diff": float("inf"), "tolerance": rtol,
                "ok": False}  # a NaN compares as "not larger" everywhere: never let it pass
    if exp.kind == "detector":
        tol = rtol  # scores and normalised boxes live in [0, 1]
        diff = _compare_detections(ort_out, ref, tol)
    else:
        tol = rtol * max(1.0, float(np.abs(ref[0]).max()))
        diff = max(float(np.abs(o.astype(np.float64) - r).max()) for o, r in zip(ort_out, ref))
    return {"input_shape": list(inputs[0].shape), "max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol}


def probe_inputs(exp: Exportable) -> list[tuple[torch.Tensor, ...]]:
    """Parity probes: batch 2 at the built size, and batch 1 at a non-square size (the detector: a
    non-square image padded into a canvas). The first is the export's example input.

    A dynamic detector's example is non-square and at least 128 px a side, so that no feature level is 1 wide
    (the exporter would fix a size seen as 1, or an H seen equal to W).
    """
    h, w = exp.size
    m = exp.multiple
    if exp.kind == "detector" and exp.dynamic_hw:
        eh, ew = max(h, 128), max(w, 128) + m
        return [exp.probe(2, (eh, ew), pad_to=(eh, ew), seed=1),
                exp.probe(1, (eh + m - 8, ew // 2), pad_to=(eh + m, ew - m), seed=2)]
    if exp.kind == "detector":
        return [exp.probe(2, seed=1), exp.probe(1, (h - m, max(m, w // 2)), seed=2)]
    if exp.dynamic_hw:
        return [exp.probe(2, seed=1), exp.probe(1, (h + m, w + 2 * m), seed=2)]  # both sides off the built size
    return [exp.probe(2, seed=1), exp.probe(1, seed=2)]


def _graph_dims(path: Path) -> dict[str, list[int | str]]:
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def export_onnx(exp: Exportable, out_dir: str | os.PathLike, *, rtol: float = DEFAULT_RTOL, opset: int = OPSET,
                name: str = "model.onnx") -> Path:
    """Export `exp` to `out_dir/name`, check it in ONNX Runtime against PyTorch, write `medssl_export.json`.

    Raises:
        ParityError: when a probe differs by more than the tolerance (the files stay for inspection,
            the JSON records the failure).
    """
    _require("onnx")
    _require("onnxscript")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    example = probe_inputs(exp)[0]
    batch = torch.export.Dim("batch", min=1, max=4096)
    first: dict[int, Any] = {0: batch}
    if exp.dynamic_hw and exp.kind == "detector":  # sizes as multiples of 32 (the padding), 64 px at least
        h, w = torch.export.Dim("h", min=2, max=512), torch.export.Dim("w", min=2, max=512)
        first.update({2: exp.multiple * h, 3: exp.multiple * w})
    elif exp.dynamic_hw:
        first.update({2: torch.export.Dim("height", min=exp.multiple, max=16384),
                      3: torch.export.Dim("width", min=exp.multiple, max=16384)})
    dynamic: tuple[dict[int, Any], ...] = (first,)
    if exp.kind == "detector":  # the mask [N, H, W] shares the images' batch and size
        dynamic = (first, {0: batch, **({1: first[2], 2: first[3]} if exp.dynamic_hw else {})})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(exp.graph, example, str(path), input_names=exp.input_names, output_names=exp.output_names,
                          opset_version=opset, dynamo=True, dynamic_shapes=dynamic, external_data=False,
                          verbose=False)
    dims = _graph_dims(path)
    if exp.dynamic_hw and not all(isinstance(d, str) for d in dims[exp.input_names[0]][2:]):
        raise RuntimeError(f"{path}: the exporter fixed H and W to {dims[exp.input_names[0]][2:]}; export with "
                           "--static (and --size) or report the model")
    session = onnx_session(path)
    checks = [parity(session, exp, p, rtol) for p in probe_inputs(exp)]
    meta = export_record(exp, name, opset, dims, checks, rtol)
    (out / META_NAME).write_text(json.dumps(meta, indent=1, default=str))
    bad = [c for c in checks if not c["ok"]]
    if bad:
        raise ParityError(f"{path}: ONNX Runtime differs from PyTorch beyond the tolerance: {bad}")
    return path


def export_record(exp: Exportable, name: str, opset: int, dims: dict[str, list], checks: list[dict],
                  rtol: float) -> dict[str, Any]:
    """The JSON a runner follows: inputs, outputs, pre/post-processing, versions, parity."""
    import onnx
    import onnxruntime

    from medssl import __version__

    h, w = exp.size
    hw_dynamic = all(isinstance(d, str) for d in dims["images"][2:])
    pre = {"intensity": "float32 in [0, 1] (medssl.data.coco.read_image / the shards' .npy)",
           "channels": exp.in_chans, "grey_to_channels": "repeat", "normalise_in_graph": True,
           "mean": exp.meta["mean"], "std": exp.meta["std"]}
    if exp.kind == "detector":
        pre.update({"resize": {**exp.meta["resize"], "rule": "medssl.data.coco.make_transforms('none')"},
                    "pad": "bottom/right with 0 to a multiple of 32 (the batch's largest image); mask True on "
                           "padding", "pad_to_multiple": 32, "min_size": 64})
        if not hw_dynamic:
            pre["canvas"] = [h, w]
            pre["pad"] = "bottom/right with 0 into the fixed canvas; mask True on padding"
        post = {"scores": "sigmoid, top-k over queries x classes, descending", "labels": "class index",
                "boxes": "xyxy normalised to the unpadded image: multiply by (w, h, w, h) of the original image",
                "index": "query * num_classes + class", "top_k": exp.meta["top_k"],
                "then": "class-agnostic NMS as medssl.metrics.detection.froc_preprocess (not in the graph)"}
    else:
        pre["size"] = [h, w] if not hw_dynamic else f"any multiple of {exp.multiple}; built for {[h, w]}"
        post = {"embedding": "pooled ViT features (timm forward)"} if exp.kind == "backbone" else \
            {"logits": "raw logits (softmax / argmax left to the user)"}
    return {"format": "medssl-onnx", "format_version": 1, "kind": exp.kind, "file": name, "opset": opset,
            "size": [h, w],
            "source": str(Path(exp.source).resolve()) if Path(exp.source).exists() else exp.source,
            "inputs": dims, "outputs": exp.output_names,
            "dynamic": {"batch": True, "height_width": hw_dynamic}, "multiple_of": exp.multiple,
            "preprocess": pre, "postprocess": post,
            "parity": {"rtol": rtol, "probes": checks, "max_abs_diff": max(c["max_abs_diff"] for c in checks)},
            "versions": {"medssl": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {k: v for k, v in exp.meta.items() if k not in ("mean", "std")}}
