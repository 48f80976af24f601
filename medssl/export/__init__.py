"""Export a medssl model for use without medssl: ONNX (checked in ONNX Runtime), a Hugging Face-style folder
with a generated model card, a MONAI bundle, and a runner that follows the export's JSON.

A layer of its own: it reads what `medssl.hub`, `medssl.heads.build` and the detector's checkpoint reader give,
and writes files; no model module knows about it (the detector switches its deformable attention to the
export form, `impl="export"`, through `medssl.detection.deformable_attn.set_attn_impl`).

Example:
    >>> from medssl.export import export_onnx, load_exportable
    >>> export_onnx(load_exportable("vit_tiny_patch16", size=(64, 64)), "exported/")  # doctest: +SKIP

Command line: ``medssl-export SOURCE --format onnx --out DIR`` (or ``python -m medssl.export``), and
``python -m medssl.export check DIR [IMAGES...]``.
"""

from __future__ import annotations

from medssl.utils import lazy_exports

__all__ = ["Exportable", "OnnxModel", "ParityError", "check", "export_bundle", "export_hf", "export_onnx",
           "load_exportable", "predict_onnx"]

_LAZY = {
    "Exportable": "medssl.export.sources",
    "load_exportable": "medssl.export.sources",
    "export_onnx": "medssl.export.onnx",
    "ParityError": "medssl.export.onnx",
    "OnnxModel": "medssl.export.runner",
    "check": "medssl.export.runner",
    "predict_onnx": "medssl.export.runner",
    "export_hf": "medssl.export.hf",
    "export_bundle": "medssl.export.bundle",
}


__getattr__ = lazy_exports("medssl.export", _LAZY)  # imported on first use
