"""The cells of the MedMask ablation (`benchmarks/medmask_ablation.py`): a row's resolved config, its stage runs
(shared between rows and selection rules wherever they train the same thing) and its test-split score.

This module and its imports are the code a cell's key fingerprints (`CODE_ENTRIES`); the tables, comparisons and
plots live in `benchmarks/medmask_ablation.py`, outside the fingerprint, so that a change to the report keeps
every cached cell.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.provenance import cell_key

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("medssl")
CODE_ENTRIES = ("medssl.detection.stages", "medssl.detection.evaluation", "data_tools.demo_mammo",
                "data_tools.demo_expert", "benchmarks.medmask_cells")
FPI_GRID = np.round(np.linspace(0.0, 2.0, 81), 4)  # false positives per image, for averaging FROC curves


def demo_argv(spec: dict[str, Any], data_seed: int | None) -> list[str] | None:
    """The generator's command-line arguments of generated set ``data_seed`` (None: the default demo set)."""
    if data_seed is None:
        return None
    args = {**(spec.get("demo") or {}), "seed": data_seed}
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def data_root(spec: dict[str, Any], data_seed: int | None) -> Path:
    """DATA_ROOT of generated set ``data_seed``: ``<data_root>/seed<g>`` (the ``data_root`` itself for None)."""
    root = Path(spec.get("data_root") or ROOT / "demo_data" / "mammo")
    return root if data_seed is None else root / f"seed{data_seed}"


def run_config(spec: dict[str, Any], row: dict[str, Any], seed: int, data_seed: int | None = None,
               rule: str = "best") -> dict[str, Any]:
    """The resolved run config of a row: recipe YAML + the spec's ``set`` + the row's ``set`` (+ seed, the
    generated set ``data_seed``, made here if missing, and the model-selection ``rule``, ``eval.checkpoint``)."""
    from data_tools.demo_mammo import ensure_demo
    from medssl.config import load_config
    from medssl.detection.config import DEFAULTS

    root = data_root(spec, data_seed)
    demo = ensure_demo(root, demo_argv(spec, data_seed))
    recipe = Path(spec.get("recipe") or "recipes/configs/medmask_demo.yaml")
    recipe = recipe if recipe.is_absolute() else ROOT / recipe
    embeddings = demo / "embeddings"
    if row.get("expert"):  # another expert's embeddings of the same images (made once)
        embeddings = demo / f"embeddings_{row['expert']}"
        if not (embeddings / "manifest.jsonl").is_file():
            from data_tools.demo_mammo import write_embeddings

            write_embeddings(demo, row["expert"], json.loads((demo / "_info.json").read_text())["args"], embeddings)
    sets = {"data.dataset": "demo", "data.data_root": str(root), "data.embeddings": str(embeddings),
            "eval.overlays": 0, "eval.pseudo_truth": "target_truth", "eval.checkpoint": rule,
            **(spec.get("set") or {}), **(row.get("set") or {}), "seed": seed}
    return load_config(DEFAULTS, recipe, [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                                          for k, v in sets.items()])


def weights_digest(checkpoint: str | Path) -> str:
    """SHA-256 (16 hex digits) over the weights a stage reads from its init checkpoint (``model``, ``mae``,
    ``distiller``): two checkpoints that hold the same weights (a stage's ``best.pt`` and ``last.pt`` when its best
    epoch is its last) feed the next stage alike, whatever their file bytes."""
    import torch

    from medssl.train.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    h = hashlib.sha256()
    for part in ("model", "mae", "distiller"):
        for name, t in sorted((ck.get(part) or {}).items()):
            t = (t if isinstance(t, torch.Tensor) else torch.as_tensor(t)).detach().cpu().contiguous()
            h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def stage_key(cfg: dict[str, Any], chain: list[str], fingerprint: str, handed: str | None = None) -> str:
    """Key of the stage run ``chain[-1]`` reached through ``chain`` with ``cfg``: the shared sections, each
    stage section of the chain, the demo set's generator arguments (a regenerated set retrains) and ``handed``,
    the `weights_digest` of the checkpoint the previous stage handed on (None for the first stage): the
    ``best`` and ``last`` chains share a run wherever the previous stage handed on the same weights."""
    shared = {k: cfg[k] for k in ("data", "model", "mae", "distill", "train", "seed", "device") if k in cfg}
    if not any(cfg[s]["distill_weight"] > 0 for s in chain if s != "source_only"):  # the expert is not read
        shared["data"] = {k: v for k, v in cfg["data"].items() if k != "embeddings"}
        shared.pop("distill")  # nor is a distiller built (source_only rows of every distillation mode share a run)
    shared["eval"] = {k: v for k, v in cfg["eval"].items() if k not in ("overlays", "test_split", "checkpoint")}
    info = Path(cfg["data"]["data_root"]) / "demo" / "_info.json"
    demo = json.loads(info.read_text()).get("args") if info.is_file() else None
    return cell_key(chain=chain, stages={s: cfg[s] for s in chain}, shared=shared, code=fingerprint, demo=demo,
                    handed=handed)


def train_chain(cfg: dict[str, Any], chain: list[str], work: Path, fingerprint: str) -> list[Path]:
    """Train (or reuse) every stage of ``chain`` in order, each from the previous one's ``eval.checkpoint``
    (best or last); returns every stage's folder, in order."""
    from medssl.detection.stages import stage_done, train_stage

    init = None
    dirs = []
    for i, stage in enumerate(chain):
        run_dir = work / "stages" / stage_key(cfg, chain[: i + 1], fingerprint,
                                               None if init is None else weights_digest(init))
        sdir = run_dir / stage
        if stage_done(sdir):
            log.info("[%s] reused %s", stage, sdir)
        else:
            c = copy.deepcopy(cfg)
            c["out"] = str(run_dir)
            train_stage(stage, c, run_dir, init=init, resume=True)
        init = sdir / f"{cfg['eval']['checkpoint']}.pt"
        dirs.append(sdir)
    return dirs


def score(cfg: dict[str, Any], checkpoint: Path | None) -> dict[str, Any]:
    """Test-split summary and FROC curve of a checkpoint, or of random boxes when ``checkpoint`` is None."""
    from medssl.data.coco import build_dataset
    from medssl.detection.data import build_splits, transforms
    from medssl.detection.evaluation import evaluate, random_baseline
    from medssl.detection.predict import load_detector
    from medssl.train.dist import resolve_device

    d = cfg["data"]
    test = build_dataset(d["dataset"], cfg["eval"]["test_split"], d["data_root"], transforms(cfg, "none"))
    if checkpoint is None:
        summary, curve = random_baseline(build_splits(cfg)["train"], test, cfg, seed=cfg["seed"])
    else:
        device = resolve_device(cfg["device"])
        model, _ = load_detector(checkpoint, device)
        summary, curve, _ = evaluate(model, test, cfg, device)
    c = curve["curve"]
    fpi, sens = np.asarray(c["fps_per_image"], float), np.asarray(c["sensitivity"], float)
    grid = [float(np.max(sens[fpi <= k + 1e-12], initial=0.0)) for k in FPI_GRID]  # R@k on the grid
    return {"summary": {k: float(v) for k, v in summary.items()}, "froc_grid": grid}


def run_row(cfg: dict[str, Any], row: dict[str, Any], work: Path, fingerprint: str) -> dict[str, Any]:
    """Train and score one row for one seed and selection rule (``cfg``: its `run_config`). A row with
    ``hand_over: true`` scores the checkpoint the recipe would hand over (``final.pt``: under ``best`` the stage
    of its chain that is best on validation, `medssl.detection.stages.handed_stage`; under ``last`` the last)
    instead of its last stage's."""
    from medssl.detection.stages import handed_stage

    t0 = time.time()
    if not row.get("stages"):
        return {**score(cfg, None), "seconds": round(time.time() - t0, 1)}
    dirs = train_chain(cfg, list(row["stages"]), work, fingerprint)
    rule = cfg["eval"]["checkpoint"]
    names = [d.name for d in dirs]
    metrics = {d.name: json.loads((d / "metrics.json").read_text()) for d in dirs}
    extra: dict[str, Any] = {}
    sdir = dirs[-1]
    if row.get("hand_over"):
        bests = {n: m.get("best") or {} for n, m in metrics.items()}
        sdir = dirs[names.index(handed_stage(bests, names, cfg["eval"]["select"], rule))]
        extra["handed_stage"] = sdir.name
    pseudo = [{k: h[k] for k in h if k.startswith("pseudo_") or k in ("epoch", "true_per_image")}
              for h in metrics[names[-1]].get("history", []) if "pseudo_precision" in h]  # the chain's last stage
    return {**score(cfg, sdir / f"{rule}.pt"), "val_best": metrics[sdir.name].get("best"), "pseudo_labels": pseudo,
            **extra, "stage_dir": str(sdir), "seconds": round(time.time() - t0, 1)}
