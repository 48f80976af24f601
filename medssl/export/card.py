"""The model card (README.md with YAML front matter), generated from what the export knows.

Training data come from the shards' `stats.json` (samples by modality and source) and a data card where one
is found or given; the config from the run's `config.yaml` beside the weights; the commit from the weights'
provenance (else the medssl checkout at export time, said as such); metrics only where they were recorded.
Fields nobody recorded (licence, the data's terms) are left for the user to fill in, and say so.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

__all__ = ["card_for", "find_run_files", "git_commit", "model_card"]

DATA_CARD_NAMES = ("DATA_CARD.md", "data_card.md", "DATACARD.md")


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the git checkout holding `path` (default: this medssl), with '+dirty' for local changes."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def find_run_files(source: str, data: str | None, stats: str | None = None, data_card: str | None = None
                   ) -> dict[str, Path | None]:
    """The run's `config.yaml` (beside the source or up to two folders above), the shards' `stats.json` and a
    data card (given, or found in the data folder)."""
    found: dict[str, Path | None] = {"config": None, "stats": Path(stats) if stats else None,
                                     "data_card": Path(data_card) if data_card else None}
    src = Path(source)
    if src.exists():
        folder = src if src.is_dir() else src.parent
        for cand in (folder, folder.parent, folder.parent.parent):
            if (cand / "config.yaml").is_file():
                found["config"] = cand / "config.yaml"
                break
    if data and Path(data).is_dir():
        if found["stats"] is None and (Path(data) / "stats.json").is_file():
            found["stats"] = Path(data) / "stats.json"
        if found["data_card"] is None:
            found["data_card"] = next((Path(data) / n for n in DATA_CARD_NAMES if (Path(data) / n).is_file()), None)
    for key in ("stats", "data_card"):
        if found[key] is not None and not found[key].is_file():
            raise FileNotFoundError(f"{key.replace('_', ' ')} file not found: {found[key]}")
    return found


def _table(rows: dict[str, Any]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()])


def model_card(*, title: str, kind: str, source: str, arch: dict[str, Any], provenance: dict[str, Any],
               metrics: dict[str, Any], files: dict[str, Path | None], usage: str,
               extra_tags: tuple[str, ...] = ()) -> str:
    """README.md text: YAML front matter (library, tags, licence left to fill, datasets) and the card body."""
    stats = json.loads(files["stats"].read_text()) if files.get("stats") else None
    config = yaml.safe_load(files["config"].read_text()) if files.get("config") else None
    commit = provenance.get("commit")
    commit_line = f"`{commit}` (recorded at training)" if commit else \
        f"`{git_commit() or 'unknown'}` (the medssl checkout at export time; the training commit was not recorded)"
    data_name = provenance.get("data")
    front = {"library_name": "timm" if kind == "backbone" else "medssl",
             "license": None,
             "tags": ["medssl", "medical-imaging", *extra_tags],
             "pipeline_tag": {"backbone": "image-feature-extraction", "classify": "image-classification",
                              "detector": "object-detection"}.get(kind, "image-segmentation"),
             "datasets": [str(data_name)] if data_name else [],
             "medssl": {"kind": kind, "source": source, "commit": commit or git_commit()}}
    lines = ["---", "# license: fill in the licence of these weights (and check the training data's terms)",
             yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             "**Intended use: research only. Not a medical device; not for clinical use or diagnosis.**", "",
             "## Model", "", _table(arch), "", "## Training data", ""]
    if data_name:
        lines.append(f"Trained on: `{data_name}`.")
    if stats:
        lines += ["", f"{stats.get('samples', '?')} images (from `{files['stats']}`).", "",
                  _table({f"modality {k}": v for k, v in stats.get("by_modality", {}).items()}
                         | {f"source {k}": v for k, v in stats.get("by_source", {}).items()})]
    if files.get("data_card"):
        lines += ["", f"Data card: `{files['data_card']}`:", "",
                  *["> " + ln for ln in files["data_card"].read_text().strip().splitlines()]]
    if not (data_name or stats or files.get("data_card")):
        lines.append("Not recorded: fill in what the model was trained on, with its licence and subjects.")
    lines += ["", "## Training configuration", ""]
    if config is not None:
        lines += [f"From `{files['config']}`:", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(),
                  "```"]
    else:
        lines.append("No run config found beside the weights.")
    prov = {k: v for k, v in provenance.items() if k not in ("commit", "data")}
    lines += ["", "## Provenance", "", _table({"commit": commit_line, **{k: f"`{v}`" for k, v in prov.items()}}),
              "", "## Metrics", ""]
    lines.append(_table({k: v for k, v in metrics.items()}) if metrics else
                 "None were recorded with these weights; evaluate on your own data before relying on them.")
    lines += ["", "## Limitations", "",
              "- Trained and checked on the data above only: other scanners, sites, populations and protocols may "
              "behave differently.",
              "- Intensities must be prepared as in training (windowing / percentile clipping to [0, 1], as "
              "medssl's shard builder does), then normalised with the mean / std above (recorded in config.json; "
              "the ONNX export applies them in its graph).",
              "- No evaluation of fairness across patient groups has been made.", "",
              "## How to use", "", usage, ""]
    return "\n".join(lines)


def _describe(exp: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str | None]:
    """(model table, provenance, metrics, data folder) of an `Exportable`, by kind."""
    h, w = exp.size
    io = {"input": f"{exp.in_chans} x {h} x {w}, intensities in [0, 1]"
                   + (f" (any size, multiples of {exp.multiple})" if exp.dynamic_hw else " (fixed size)"),
          "normalisation": f"mean {exp.meta['mean']}, std {exp.meta['std']}"}
    bb = exp.meta.get("backbone") or {}
    prov = dict(bb.get("provenance") or {})
    vit = {"backbone": f"ViT {bb.get('architecture') or ''} ({bb.get('embed_dim')} wide, {bb.get('depth')} blocks, "
                       f"patch {bb.get('patch_size')}), from {bb.get('loaded_from', exp.source)}"} if bb else {}
    metrics = {k: v for k, v in (exp.meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
    data = prov.get("data")
    if exp.kind == "backbone":
        table = {**vit, **io, "output": f"{exp.meta['embed_dim']}-d embedding (timm forward: cls token after the "
                                        "final norm)"}
        metrics.update({k: prov.pop(k) for k in ("final_loss",) if prov.get(k) is not None})
    elif exp.kind in ("classify", "segment"):
        rec = exp.meta["record"]
        classes = exp.meta.get("classes")
        table = {"head": f"{rec['kind']} ({rec['protocol']}), {rec['num_classes']} classes"
                         + (f": {', '.join(map(str, classes))}" if classes else ""),
                 **vit, **io, "output": "logits"}
        prov = {"backbone source": rec.get("backbone_source"), "backbone provenance": prov or None,
                "epoch": exp.meta.get("epoch")}
        data = None
    else:
        d, det = exp.meta["data"], exp.meta["detector"]
        table = {"detector": f"Deformable DETR ({det.get('backbone')} {det.get('backbone_name')}, "
                             f"{det.get('hidden_dim')} wide, {det.get('enc_layers')}+{det.get('dec_layers')} layers, "
                             f"{det.get('num_queries')} queries, two-stage {det.get('two_stage')})", **io,
                 "output": f"top-{exp.meta['top_k']} scores, labels, boxes (xyxy, normalised)"}
        prov = {"stage": exp.meta.get("stage"), "epoch": exp.meta.get("epoch"),
                "dataset": f"{d.get('dataset')} in {d.get('data_root')} (train split {d.get('train_split')}, "
                           f"target {d.get('target_dataset') or d.get('dataset')}/{d.get('target_split')})"}
        data = str(Path(d.get("data_root", "")) / str(d.get("dataset")))
        prov["data"] = data
    return table, {k: v for k, v in prov.items() if v is not None}, metrics, data


def card_for(exp: Any, usage: str, *, stats: str | None = None, data_card: str | None = None,
             title: str | None = None) -> str:
    """The model card of an `medssl.export.sources.Exportable` (any kind)."""
    table, prov, metrics, data = _describe(exp)
    files = find_run_files(exp.source, data, stats, data_card)
    tags = {"backbone": ("self-supervised", "mae", "vit"), "detector": ("lesion-detection", "deformable-detr")}
    return model_card(title=title or f"medssl {exp.kind}: {Path(exp.source).name}", kind=exp.kind,
                      source=exp.source, arch=table, provenance=prov, metrics=metrics, files=files, usage=usage,
                      extra_tags=tags.get(exp.kind, ()))
