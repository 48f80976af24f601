"""A Hugging Face-style folder: `config.json` + `model.safetensors` + `README.md` (generated model card).

The folder is a `medssl.save_backbone` folder whose `config.json` also carries timm's fields
(`architecture`, `pretrained_cfg`, `model_args`), so that both read it back:

    medssl.load_backbone("folder")
    timm.create_model("local-dir:folder", pretrained=True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medssl.export.card import card_for
from medssl.export.sources import Exportable

__all__ = ["TIMM_ENTRY", "export_hf"]

TIMM_ENTRY = "vit_base_patch16_224"  # a timm factory name; `model_args` set every size, so any ViT entry would do


def export_hf(exp: Exportable, out_dir: str | os.PathLike, *, data_card: str | None = None,
              stats: str | None = None) -> Path:
    """Write the folder for a backbone export (`load_exportable` of a backbone source); returns the folder."""
    from medssl.hub import CONFIG_NAME, save_backbone

    if exp.kind != "backbone":
        raise ValueError(f"{exp.source}: --format hf writes backbones (timm ViTs); a {exp.kind} exports with "
                         "--format onnx")
    vit = exp.graph.model
    cfg = exp.meta["backbone"]
    prov = dict(cfg.get("provenance") or {})
    out = Path(out_dir)
    save_backbone(vit, out, mean=cfg["mean"], std=cfg["std"], architecture=cfg.get("architecture"),
                  **{**prov, "exported_from": exp.source})
    conf = json.loads((out / CONFIG_NAME).read_text())
    h, w = conf["img_size"]
    model_args = {"img_size": [h, w], "patch_size": conf["patch_size"], "embed_dim": conf["embed_dim"],
                  "depth": conf["depth"], "num_heads": conf["num_heads"], "mlp_ratio": conf["mlp_ratio"],
                  "in_chans": conf["in_chans"], "qkv_bias": True, "class_token": True, "global_pool": "token"}
    conf.update({"medssl_architecture": conf.get("architecture"), "architecture": TIMM_ENTRY, "num_classes": 0,
                 "num_features": conf["embed_dim"], "global_pool": "token", "model_args": model_args,
                 "pretrained_cfg": {"input_size": [conf["in_chans"], h, w], "mean": conf["mean"], "std": conf["std"],
                                    "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0,
                                    "fixed_input_size": False, "license": None}})
    (out / CONFIG_NAME).write_text(json.dumps(conf, indent=2, default=str))
    usage = "\n".join(["```python", "import medssl, timm",
                       f'vit = medssl.load_backbone("{out.name}", in_chans={conf["in_chans"]})',
                       f'vit = timm.create_model("local-dir:{out.name}", pretrained=True)', "```"])
    card = card_for(exp, usage, stats=stats, data_card=data_card, title=f"medssl backbone: {out.name}")
    (out / "README.md").write_text(card)
    return out
