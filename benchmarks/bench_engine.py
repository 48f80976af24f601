"""Training throughput through the training loop: the MedMask detector on the demo config and a ViT fine-tune.

Measures what a user sees per training step, data loading included, so that a change of the loop (the one
engine) can be compared against an older checkout of medssl in the same run:

    python -m benchmarks.bench_engine --rounds 3 --json benchmarks/results/bench_engine.json
    python -m benchmarks.bench_engine --rounds 3 --trees /path/to/old/checkout .   # interleaved A/B

With `--trees`, each round runs every tree once in a fresh process (`PYTHONPATH=<tree>`), the order rotated
per round; the figures are medians over rounds with min and max. `BENCH_THREADS` sets torch's threads;
`BENCH_PRECISION=fp32` pins the detector's `train.precision` where the tree has it (trees before the one
engine train the detector in fp32 only, while `auto` picks bf16 on CPUs with native bf16).
Detector: `source_only` on the demo set (`recipes/configs/medmask_demo.yaml`), images/s over the training
steps of one epoch (evaluation excluded).
Fine-tune: `FineTuneClassifier` on a ViT-Ti/8 at 64 px with layer-wise lr decay, batch 16, seconds per
optimizer step (evaluation excluded by evaluating only once, at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _detector(data_root: str, steps: int) -> dict:
    import torch

    from medssl.config import load_config

    try:  # the one-engine layout
        from medssl.detection.config import DEFAULTS
        from medssl.detection.stages import train_stage
    except ImportError:  # an older checkout
        from medssl.detection.engine import DEFAULTS, train_stage
    from data_tools.demo_mammo import ensure_demo

    ensure_demo(data_root)
    with tempfile.TemporaryDirectory() as out:
        sets = [f"data.data_root={data_root}", f"out={out}", "source_only.epochs=1", "eval.test_split=null",
                f"data.embeddings={Path(data_root) / 'demo' / 'embeddings'}"]
        precision = os.environ.get("BENCH_PRECISION")  # e.g. fp32: older trees train fp32 only
        if precision and "precision" in DEFAULTS["train"]:
            sets.append(f"train.precision={precision}")
        cfg = load_config(DEFAULTS, Path("recipes/configs/medmask_demo.yaml"), sets)  # the tree's own demo config
        torch.manual_seed(0)
        from medssl.data.coco import build_dataset

        n = len(build_dataset("demo", "train", data_root))
        res = train_stage("source_only", cfg, out)
        return {"images": n, "seconds": res["history"][0]["seconds"],
                "images_per_s": n / res["history"][0]["seconds"]}


def _finetune(steps: int) -> dict:
    import torch
    from torch.utils.data import TensorDataset

    import medssl
    from medssl.heads.classify import FineTuneClassifier, layer_decay_groups
    from medssl.heads.fit import FitConfig, fit

    torch.manual_seed(0)
    n, bs = 16 * steps, 16
    data = TensorDataset(torch.randn(n, 1, 64, 64), torch.randint(0, 2, (n,)))
    val = TensorDataset(torch.randn(16, 1, 64, 64), torch.randint(0, 2, (16,)))
    vit = medssl.load_backbone("vit_tiny_patch8", img_size=64, in_chans=1)
    model = FineTuneClassifier(vit, 2, drop_path_rate=0.1)
    groups = layer_decay_groups(model, len(vit.blocks), 1e-3, 0.05, 0.75)
    cfg = FitConfig(epochs=1, batch_size=bs, lr=1e-3, warmup_epochs=0, device="cpu", eval_every=1)
    t0 = time.perf_counter()
    fit(model, data, val, torch.nn.functional.cross_entropy, lambda o, t: 0.0, cfg, param_groups=groups)
    seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": seconds, "seconds_per_step": seconds / steps}


def _one(kind: str, data_root: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    return _detector(data_root, steps) if kind == "detector" else _finetune(steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="+", default=[str(ROOT)], help="checkouts of medssl to compare")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="fine-tune steps per measurement")
    p.add_argument("--data-root", default="demo_data/mammo")
    p.add_argument("--kinds", nargs="+", default=["detector", "finetune"], choices=["detector", "finetune"])
    p.add_argument("--json", default=None)
    p.add_argument("--one", nargs=2, metavar=("KIND", "TREE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(_one(a.one[0], a.data_root, a.steps)))
        return 0
    results: dict[str, dict[str, list[dict]]] = {k: {t: [] for t in a.trees} for k in a.kinds}
    for r in range(a.rounds):
        order = a.trees[r % len(a.trees):] + a.trees[:r % len(a.trees)]
        for kind in results:
            for tree in order:
                env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", kind, tree, "--steps", str(a.steps),
                       "--data-root", str(Path(a.data_root).resolve())]  # medssl imported from the tree
                out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
                results[kind][tree].append(json.loads(out.strip().splitlines()[-1]))
                print(kind, tree, results[kind][tree][-1], flush=True)
    table = {}
    for kind, per_tree in results.items():
        key = "images_per_s" if kind == "detector" else "seconds_per_step"
        for tree, runs in per_tree.items():
            vals = [x[key] for x in runs]
            table[f"{kind} {key} [{tree}]"] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    for k, v in table.items():
        print(f"{k}: median {v['median']:.3f} [min {v['min']:.3f}, max {v['max']:.3f}]")
    if a.json:
        commits = {t: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=t, capture_output=True,
                                     text=True).stdout.strip() for t in a.trees}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        from benchmarks.speed import machine_info

        Path(a.json).write_text(json.dumps({"machine": machine_info("cpu"), "command": " ".join(
                                                ["python -m benchmarks.bench_engine", *(argv or sys.argv[1:])]),
                                            "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": a.rounds,
                                            "threads": int(os.environ.get("BENCH_THREADS", "2")),
                                            "precision": os.environ.get("BENCH_PRECISION", "config"),
                                            "commits": commits, "results": results, "table": table}, indent=1))
    return 0


def report(result: dict) -> list[str]:
    """README lines of a result file: per kind, each tree's median [min, max] and the per-round ratios."""
    lines = []
    for kind, per_tree in result["results"].items():
        key = "images_per_s" if kind == "detector" else "seconds_per_step"
        trees = list(per_tree)
        name = {t: result.get("commits", {}).get(t) or Path(t).name for t in trees}
        figs = "; ".join(f"`{name[t]}` {statistics.median(x[key] for x in per_tree[t]):.3f} "
                         f"[{min(x[key] for x in per_tree[t]):.3f}, {max(x[key] for x in per_tree[t]):.3f}]"
                         for t in trees)
        line = (f"{kind} ({key.replace('_', ' ')}, median [min, max] of {len(per_tree[trees[0]])} interleaved rounds, "
                f"{result.get('threads', '?')} thread(s), precision {result.get('precision', 'config')}): {figs}")
        if len(trees) == 2:
            a, b = ([x[key] for x in per_tree[t]] for t in trees)
            ratios = [y / x if kind == "detector" else x / y for x, y in zip(a, b)]  # > 1: the second tree faster
            line += (f"; `{name[trees[1]]}` vs `{name[trees[0]]}` per round: "
                     f"{', '.join(f'{r:.2f}x' for r in ratios)} (median {statistics.median(ratios):.2f}x, > 1: faster)")
        lines.append(line + ".")
    return lines


if __name__ == "__main__":
    sys.exit(main())
