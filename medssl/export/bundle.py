"""A MONAI bundle of an export: `configs/metadata.json`, `configs/inference.json`, `models/model.pt`,
`models/model.onnx` (+ its `medssl_export.json`) and `docs/README.md` (the generated model card).

`configs/inference.json` defines `network_def` with `build_network` (the architecture from its record, no
file read), so MONAI's own tools rebuild the network and load `models/model.pt` (the graph's state dict:
normalisation included, inputs are intensities in [0, 1]):

    python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
        --config_file configs/inference.json
    python -m monai.bundle ckpt_export network_def --filepath model.ts --ckpt_file models/model.pt ...
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.export.card import card_for
from medssl.export.onnx import DEFAULT_RTOL, META_NAME, export_onnx
from medssl.export.sources import Exportable

__all__ = ["MONAI_SCHEMA", "build_network", "export_bundle"]

# the schema MONAI's verify_metadata validates against (fetched by MONAI from this address when it runs)
MONAI_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                "meta_schema_20240725.json")


def build_network(kind: str, record: dict[str, Any], mean: list[float], std: list[float], top_k: int = 100
                  ) -> nn.Module:
    """The exported graph module of a bundle, randomly initialised, from its record (reads no file).

    Args:
        kind: backbone | classify | segment | detector.
        record: backbone architecture record, head record, or detector config.
        mean / std: the normalisation the graph applies.
        top_k: detector only.
    """
    from medssl.export.graphs import BackboneGraph, DetectorGraph, HeadGraph, make_vit_dynamic

    if kind == "backbone":
        from medssl.hub import build_backbone_model

        return BackboneGraph(build_backbone_model(record, dynamic_img_size=True), mean, std).eval()
    if kind in ("classify", "segment"):
        from medssl.heads.build import build_head

        model = build_head(record)
        make_vit_dynamic(model.backbone)
        return HeadGraph(model, mean, std).eval()
    if kind == "detector":
        from medssl.detection.detr import build_detector

        return DetectorGraph(build_detector(dict(record)), mean, std, top_k).eval()
    raise ValueError(f"kind must be backbone, classify, segment or detector, got {kind!r}")


def _record(exp: Exportable) -> dict[str, Any]:
    if exp.kind == "backbone":
        from medssl.hub import backbone_record

        return backbone_record(exp.source)
    if exp.kind == "detector":
        return dict(exp.meta["detector"])
    return dict(exp.meta["record"])


def _data_format(exp: Exportable, out_channels: int) -> dict[str, Any]:
    h, w = exp.size
    image = {"type": "image", "format": "magnitude", "modality": "any medical 2-D image, grey, intensities in [0, 1]",
             "num_channels": exp.in_chans, "spatial_shape": [h, w], "dtype": "float32", "value_range": [0, 1],
             "is_patch_data": False, "channel_def": {str(i): "image" for i in range(exp.in_chans)}}
    if exp.kind == "backbone":
        pred = {"type": "embedding", "format": "features", "num_channels": out_channels, "spatial_shape": [],
                "value_range": [], "channel_def": {}}
    elif exp.kind == "classify":
        classes = exp.meta.get("classes") or [str(i) for i in range(out_channels)]
        pred = {"type": "probabilities", "format": "logits", "num_channels": out_channels, "spatial_shape": [],
                "value_range": [], "channel_def": {str(i): str(c) for i, c in enumerate(classes)}}
    elif exp.kind == "segment":
        pred = {"type": "image", "format": "segmentation", "num_channels": out_channels, "spatial_shape": [h, w],
                "value_range": [], "channel_def": {str(i): str(i) for i in range(out_channels)}}
    else:
        pred = {"type": "object", "format": "boxes, scores, labels (top-k, xyxy normalised to the image)",
                "num_channels": exp.meta["top_k"], "spatial_shape": [], "value_range": [0, 1], "channel_def": {}}
    return {"inputs": {"image": image},
            "outputs": {"pred": {**pred, "dtype": "float32", "is_patch_data": False}}}


def export_bundle(exp: Exportable, out_dir: str | os.PathLike, *, rtol: float = DEFAULT_RTOL,
                  data_card: str | None = None, stats: str | None = None, version: str = "0.1.0") -> Path:
    """Write a MONAI bundle for `exp`; the ONNX inside is parity-checked as `export_onnx` does."""
    import numpy

    from medssl import __version__

    out = Path(out_dir)
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    export_onnx(exp, out / "models", rtol=rtol)
    export_meta = json.loads((out / "models" / META_NAME).read_text())
    torch.save(exp.graph.state_dict(), out / "models" / "model.pt")
    with torch.no_grad():
        probe = exp.probe(1)
        y = exp.graph(*probe)
    out_channels = int((y[0] if isinstance(y, tuple) else y).shape[1])
    record = _record(exp)
    net = {"_target_": "medssl.export.bundle.build_network", "kind": exp.kind, "record": record,
           "mean": exp.meta["mean"], "std": exp.meta["std"]}
    if exp.kind == "detector":
        net["top_k"] = exp.meta["top_k"]
    inference = {"imports": ["$import medssl"], "bundle_root": ".", "device": "$torch.device('cpu')",
                 "network_def": net, "network": "$@network_def.to(@device)",
                 "checkpoint": "$@bundle_root + '/models/model.pt'",
                 "onnx_model": "$@bundle_root + '/models/model.onnx'"}
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=1, default=str))
    prov = dict((exp.meta.get("backbone") or {}).get("provenance") or {})
    data = prov.get("data") or (exp.meta.get("data") or {}).get("dataset")
    metrics = {k: v for k, v in (exp.meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
    meta = {
        "schema": MONAI_SCHEMA, "version": version, "changelog": {version: "exported by medssl"},
        "monai_version": _monai_version(), "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"medssl": __version__, "onnxruntime": export_meta["versions"]["onnxruntime"]},
        "optional_packages_version": {},
        "name": f"medssl {exp.kind}", "task": {"backbone": "feature extraction", "classify": "classification",
                                               "segment": "segmentation", "detector": "lesion detection"}[exp.kind],
        "description": f"medssl {exp.kind} exported from {exp.source}. Research use only, not for clinical use.",
        "intended_use": "Research only. Not a medical device; not for clinical use or diagnosis.",
        "authors": "fill in", "copyright": "fill in", "license": "fill in",
        "data_source": str(data) if data else "not recorded: fill in",
        "data_type": "2-D greyscale images, intensities in [0, 1]",
        "image_classes": f"{exp.in_chans} channel(s), the grey image repeated",
        "eval_metrics": metrics, "intended_size": list(exp.size),
        "network_data_format": _data_format(exp, out_channels),
        "medssl": {"kind": exp.kind, "source": exp.source, "provenance": prov, "platform": platform.platform(),
                   "onnx_parity": export_meta["parity"]},
    }
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=1, default=str))
    usage = "\n".join(["```bash", "python -m monai.bundle verify_net_in_out network_def "
                       "--meta_file configs/metadata.json --config_file configs/inference.json",
                       f"python -m medssl.export check {out.name}/models IMAGES...", "```"])
    (out / "docs" / "README.md").write_text(card_for(exp, usage, stats=stats, data_card=data_card,
                                                     title=f"medssl {exp.kind} (MONAI bundle)"))
    return out


def _monai_version() -> str:
    try:
        import monai

        return monai.__version__
    except ImportError:
        return "not installed at export"
