"""What each MedMask stage adds on the target domain: the ablation table over seeds, one command.

    python benchmarks/medmask_ablation.py --config benchmarks/configs/medmask.yaml
    python benchmarks/medmask_ablation.py --config benchmarks/configs/medmask.yaml --seeds 0 --rows source_only oracle
    python benchmarks/medmask_ablation.py --config benchmarks/configs/medmask.yaml --report   # tables from the cache

Rows (the config's ``rows``; each names the stages it trains, in order, and its config overrides): random
boxes; ``source_only``; + the feature MAE alone; + the distillation alone; the full stage 2; stage 3
(teaching) after the full stage 2; a row may name another ``expert`` (e.g. a random ViT, embeddings
extracted once into ``demo/embeddings_<expert>``); and an oracle (the ``source_only`` detector trained on the labelled
target-domain pool, which only a generated set can offer). Every row is trained with the recipe's code
(`medssl.detection.stages.train_stage`) on the recipe's config (``recipe``, default
``recipes/configs/medmask_demo.yaml``) and scored once, on the target-domain test split, with its
best-on-validation checkpoint: FROC R@0.3, mean sensitivity over the FROC points, COCO AP50.

Stage runs are shared: a stage is trained once per seed for a given chain of stage configs (the
``source_only`` run feeds every stage-2 row of its seed; the full stage 2 feeds stage 3) and kept under
``OUT/stages/<key>/``; a row's result is a cached cell (``OUT/cells/<key>.json``) keyed by its resolved
config, seed, the demo set's arguments and the fingerprint of the detection code (`benchmarks.provenance`), so a
re-run after a code change recomputes and an interrupted run continues where it stopped. Teaching rows
log the pseudo-labels' precision / recall against the target pool's true boxes per epoch
(``eval.pseudo_truth``: a diagnostic, never a training signal).

Writes ``OUT/results.json`` / ``results.md`` (mean +- std over seeds), ``OUT/froc.png`` (every row's FROC
on the test split, sensitivity averaged over seeds) and ``OUT/config.resolved.yaml``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.provenance import cached_cell, cell_key, code_files, code_fingerprint, git_commit
from medssl.config import read_yaml

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("medssl")
CODE_ENTRIES = ("medssl.detection.stages", "medssl.detection.evaluation", "data_tools.demo_mammo",
                "data_tools.demo_expert", "benchmarks.medmask_ablation")
FPI_GRID = np.round(np.linspace(0.0, 2.0, 81), 4)  # false positives per image, for averaging FROC curves


def run_config(spec: dict[str, Any], row: dict[str, Any], seed: int) -> dict[str, Any]:
    """The resolved run config of a row: recipe YAML + the spec's ``set`` + the row's ``set`` (+ seed)."""
    from data_tools.demo_mammo import ensure_demo
    from medssl.config import load_config
    from medssl.detection.config import DEFAULTS

    root = Path(spec.get("data_root") or ROOT / "demo_data" / "mammo")
    demo = ensure_demo(root)
    recipe = Path(spec.get("recipe") or "recipes/configs/medmask_demo.yaml")
    recipe = recipe if recipe.is_absolute() else ROOT / recipe
    embeddings = demo / "embeddings"
    if row.get("expert"):  # another expert's embeddings of the same images (made once)
        embeddings = demo / f"embeddings_{row['expert']}"
        if not (embeddings / "manifest.jsonl").is_file():
            from data_tools.demo_mammo import write_embeddings

            write_embeddings(demo, row["expert"], json.loads((demo / "_info.json").read_text())["args"], embeddings)
    sets = {"data.dataset": "demo", "data.data_root": str(root), "data.embeddings": str(embeddings),
            "eval.overlays": 0, "eval.pseudo_truth": "target_truth", **(spec.get("set") or {}),
            **(row.get("set") or {}), "seed": seed}
    return load_config(DEFAULTS, recipe, [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                                          for k, v in sets.items()])


def _stage_key(cfg: dict[str, Any], chain: list[str], fingerprint: str) -> str:
    """Key of the stage run ``chain[-1]`` reached through ``chain`` with ``cfg``: the shared sections, each
    stage section of the chain and the demo set's generator arguments (a regenerated set retrains)."""
    shared = {k: cfg[k] for k in ("data", "model", "mae", "distill", "train", "seed", "device") if k in cfg}
    if not any(cfg[s]["distill_weight"] > 0 for s in chain if s != "source_only"):  # the expert is not read
        shared["data"] = {k: v for k, v in cfg["data"].items() if k != "embeddings"}
    shared["eval"] = {k: v for k, v in cfg["eval"].items() if k not in ("overlays", "test_split")}
    info = Path(cfg["data"]["data_root"]) / "demo" / "_info.json"
    demo = json.loads(info.read_text()).get("args") if info.is_file() else None
    return cell_key(chain=chain, stages={s: cfg[s] for s in chain}, shared=shared, code=fingerprint, demo=demo)


def train_chain(cfg: dict[str, Any], chain: list[str], work: Path, fingerprint: str) -> Path:
    """Train (or reuse) every stage of ``chain`` in order, each from the previous best; returns the last
    stage's folder."""
    from medssl.detection.stages import stage_done, train_stage

    init = None
    sdir = work
    for i, stage in enumerate(chain):
        run_dir = work / "stages" / _stage_key(cfg, chain[: i + 1], fingerprint)
        sdir = run_dir / stage
        if stage_done(sdir):
            log.info("[%s] reused %s", stage, sdir)
        else:
            c = copy.deepcopy(cfg)
            c["out"] = str(run_dir)
            train_stage(stage, c, run_dir, init=init, resume=True)
        init = sdir / "best.pt"
    return sdir


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
    """Train and score one row for one seed (``cfg``: its `run_config`)."""
    t0 = time.time()
    if not row.get("stages"):
        return {**score(cfg, None), "seconds": round(time.time() - t0, 1)}
    sdir = train_chain(cfg, list(row["stages"]), work, fingerprint)
    metrics = json.loads((sdir / "metrics.json").read_text())
    pseudo = [{k: h[k] for k in h if k.startswith("pseudo_") or k in ("epoch", "true_per_image")}
              for h in metrics.get("history", []) if "pseudo_precision" in h]
    return {**score(cfg, sdir / "best.pt"), "val_best": metrics.get("best"), "pseudo_labels": pseudo,
            "stage_dir": str(sdir), "seconds": round(time.time() - t0, 1)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]], cells: dict[tuple[str, int], dict[str, Any]], seeds: list[int]
              ) -> list[dict[str, Any]]:
    """Per row: mean and std over seeds of R@0.3, mean sensitivity and AP50, the mean FROC, pseudo-label P/R."""
    out = []
    for row in rows:
        got = [cells[(row["name"], s)] for s in seeds if (row["name"], s) in cells]
        if not got:
            continue
        entry: dict[str, Any] = {"row": row["name"], "seeds": len(got)}
        for metric in ("R@0.3", "mean_sensitivity", "AP50"):
            entry[metric] = _mean_std([g["summary"][metric] for g in got])
        entry["froc_grid"] = np.mean([g["froc_grid"] for g in got], axis=0).tolist()
        pl = [g.get("pseudo_labels") or [] for g in got]
        if any(pl):
            epochs = max(len(p) for p in pl)
            entry["pseudo_labels"] = [
                {k: _mean_std([p[e][k] for p in pl if len(p) > e and np.isfinite(p[e][k])] or [float("nan")])
                 for k in ("pseudo_precision", "pseudo_recall", "pseudo_per_image")} for e in range(epochs)]
        out.append(entry)
    return out


def _num(x: float) -> str:
    """Two decimals, or "- (no pseudo-label)" for NaN."""
    return "- (no pseudo-label)" if not np.isfinite(x) else f"{x:.2f}"


def report(table: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Markdown: the ablation table and the pseudo-label diagnostics."""
    lines = [f"MedMask ablation on the target-domain test split ({meta['test_images']} images, "
             f"{meta['test_lesions']} lesions), CPU demo scale, mean +- std over seeds (n per row) "
             f"({meta['minutes']:.0f} min of training on {meta['machine']}); `{meta['command']}`:", "",
             "| row | n | R@0.3 | mean sensitivity (FROC points) | AP50 |", "|---|---|---|---|---|"]
    for e in table:
        cells = " | ".join(f"{e[m][0]:.3f} +- {e[m][1]:.3f}" for m in ("R@0.3", "mean_sensitivity", "AP50"))
        lines.append(f"| {e['row']} | {e['seeds']} | {cells} |")
    pl_rows = [e for e in table if e.get("pseudo_labels")]
    for e in pl_rows:
        lines += ["", f"Pseudo-labels of `{e['row']}` against the target pool's true boxes (IoU >= 0.5), per "
                  "teaching epoch: " + "; ".join(
                      f"epoch {i}: precision {_num(p['pseudo_precision'][0])}, recall {_num(p['pseudo_recall'][0])}, "
                      f"{p['pseudo_per_image'][0]:.2f} per image" for i, p in enumerate(e["pseudo_labels"])) + "."]
    return lines


def plot(table: list[dict[str, Any]], path: Path) -> None:
    """Every row's seed-averaged FROC on the test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in table:
        ax.plot(FPI_GRID, e["froc_grid"], label=f"{e['row']} (R@0.3 {e['R@0.3'][0]:.2f})",
                linestyle="--" if e["row"].startswith(("random", "oracle")) else "-")
    ax.axvline(0.3, color="grey", linewidth=0.5)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("lesion sensitivity")
    ax.set_ylim(0, 1)
    ax.set_title("MedMask rows on the target-domain test split (mean over seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "benchmarks" / "configs" / "medmask.yaml")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: the config's `out`)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--rows", nargs="+", default=None, help="row names to run (default: all)")
    p.add_argument("--report", action="store_true", help="only write the tables from cached cells")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = read_yaml(a.config.read_text())
    out = a.out or ROOT / spec.get("out", "benchmarks/results/medmask")
    seeds = a.seeds or list(spec.get("seeds", [0, 1, 2]))
    rows = [r for r in spec["rows"] if a.rows is None or r["name"] in a.rows]
    files = code_files(list(CODE_ENTRIES))
    fingerprint = code_fingerprint(files)
    commit = git_commit(files)
    demo_args = json.loads((Path(run_config(spec, rows[0], seeds[0])["data"]["data_root"]) / "demo" / "_info.json")
                           .read_text())["args"]
    out.mkdir(parents=True, exist_ok=True)
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for seed in seeds:
        for row in rows:
            cfg = run_config(spec, row, seed)
            key = cell_key(row=row, seed=seed, config=cfg, demo=demo_args, code=fingerprint)
            if a.report:
                f = out / "cells" / f"{key}.json"
                if f.is_file():
                    cells[(row["name"], seed)] = json.loads(f.read_text())
                continue
            log.info("row %r seed %d", row["name"], seed)
            res, cached = cached_cell(out / "cells", key, lambda cfg=cfg, row=row: run_row(cfg, row, out, fingerprint),
                                      meta={"row": row["name"], "seed": seed, "fingerprint": fingerprint,
                                            "commit": commit})
            cells[(row["name"], seed)] = res
            log.info("row %r seed %d%s: %s", row["name"], seed, " (cached)" if cached else "",
                     {k: round(v, 3) for k, v in res["summary"].items() if k in ("R@0.3", "AP50")})
    table = aggregate(rows, cells, seeds)
    if not table:
        print("no finished cells")
        return 1
    from benchmarks.speed import machine_info
    from medssl.data.coco import build_dataset

    cfg0 = run_config(spec, rows[0], seeds[0])
    test = build_dataset("demo", cfg0["eval"]["test_split"], cfg0["data"]["data_root"])
    m = machine_info("cpu")
    meta = {"seeds": len(seeds), "test_images": len(test), "test_lesions": sum(len(test.gt_boxes_xyxy(i))
                                                                             for i in range(len(test))),
            "minutes": sum(c.get("seconds", 0) for c in cells.values()) / 60,
            "machine": f"{m['cpu']}, {m['cpus']} CPUs, {', '.join(m['cpu_flags'])}",
            "command": " ".join(["python", "benchmarks/medmask_ablation.py", *(argv or sys.argv[1:])]),
            "fingerprint": fingerprint, "commit": commit, "demo": demo_args, "date": m["date"]}
    import yaml

    (out / "config.resolved.yaml").write_text(yaml.safe_dump({"spec": spec, "seeds": seeds, "run_config": cfg0},
                                                             sort_keys=False))
    (out / "results.json").write_text(json.dumps({"meta": meta, "table": table}, indent=1))
    text = "\n".join(report(table, meta)) + "\n"
    (out / "results.md").write_text(text)
    plot(table, out / "froc.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
