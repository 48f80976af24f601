"""Does a bf16 MAE run learn like the fp32 one, and how much faster is it? Same recipe, same seed, twice.

    python benchmarks/bf16_curve.py --json benchmarks/results/bf16_curve.json          # demo config, 5 epochs
    python benchmarks/bf16_curve.py --epochs 2 --threads 1 --out runs/bf16_curve

Runs `recipes/pretrain_lumid.py --config recipes/configs/demo_cpu.yaml` (LUMID-mini, tiny ViT/8 at 64 px)
with `train.precision=fp32` and with `train.precision=bf16`, one after the other in fresh processes, and
compares the loss logged every `output.log_every` steps: the gap per logged step (bf16 - fp32, relative to
fp32) and the final losses, plus each run's images/s (the engine's mean over its logged intervals). On a
CPU without native bf16 (AVX2) bf16 is emulated and several times slower; the result file records the CPU
flags so a figure always says where it came from. Writes a PNG of both curves beside the JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.speed import machine_info

ROOT = Path(__file__).resolve().parents[1]


def _curve(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """(steps, losses, images/s) from a run's metrics.csv."""
    with (run_dir / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    return ([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows],
            [float(r["images_per_s"]) for r in rows if r.get("images_per_s")])


def compare(fp32: tuple[list[int], list[float], list[float]], bf16: tuple[list[int], list[float], list[float]]
            ) -> dict:
    """Gap statistics of two loss curves logged at the same steps, and the speed ratio."""
    steps = sorted(set(fp32[0]) & set(bf16[0]))
    a = dict(zip(fp32[0], fp32[1], strict=True))
    b = dict(zip(bf16[0], bf16[1], strict=True))
    rel = [(b[s] - a[s]) / a[s] for s in steps]
    tail = max(1, len(steps) // 5)  # the last fifth of the run
    last_a = sum(a[s] for s in steps[-tail:]) / tail
    last_b = sum(b[s] for s in steps[-tail:]) / tail
    ips_a = sum(fp32[2]) / max(len(fp32[2]), 1)
    ips_b = sum(bf16[2]) / max(len(bf16[2]), 1)
    return {"steps": steps, "loss_fp32": [a[s] for s in steps], "loss_bf16": [b[s] for s in steps],
            "max_abs_rel_gap": max(abs(x) for x in rel), "mean_rel_gap": sum(rel) / len(rel),
            "final_loss_fp32": last_a, "final_loss_bf16": last_b, "final_rel_gap": (last_b - last_a) / last_a,
            "images_per_s_fp32": ips_a, "images_per_s_bf16": ips_b, "bf16_speedup": ips_b / max(ips_a, 1e-9)}


def report(result: dict) -> list[str]:
    """Markdown lines for docs/speed.md."""
    r = result["compare"]
    return [f"bf16 vs fp32 MAE pretraining (`benchmarks/bf16_curve.py`: demo config, {result['epochs']} epochs, "
            f"{len(r['steps'])} logged points, same seed): final loss {r['final_loss_bf16']:.4f} (bf16) vs "
            f"{r['final_loss_fp32']:.4f} (fp32), {r['final_rel_gap']:+.2%}; largest gap at a logged step "
            f"{r['max_abs_rel_gap']:.2%}, mean {r['mean_rel_gap']:+.2%}; {r['images_per_s_bf16']:.0f} vs "
            f"{r['images_per_s_fp32']:.0f} images/s ({r['bf16_speedup']:.2f}x)."]


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["compare"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(r["steps"], r["loss_fp32"], label="fp32")
    ax.plot(r["steps"], r["loss_bf16"], label="bf16 autocast", linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("MAE loss (norm-pix)")
    ax.set_title(f"demo MAE, {result['machine']['cpu']} ({', '.join(result['machine']['cpu_flags'])})", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="OMP threads of each run (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bf16_curve")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    curves = {}
    seconds = {}
    for precision in ("fp32", "bf16"):
        run_dir = a.out / precision
        cmd = [sys.executable, str(ROOT / "recipes" / "pretrain_lumid.py"), "--config",
               str(ROOT / "recipes" / "configs" / "demo_cpu.yaml"), f"train.precision={precision}",
               f"train.epochs={a.epochs}", f"output.dir={run_dir}", "output.figure_every=0"]
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed one
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        seconds[precision] = time.perf_counter() - t0
        curves[precision] = _curve(run_dir)
    info = machine_info("cpu")
    result = {"machine": info, "command": " ".join(["python", "benchmarks/bf16_curve.py", *(argv or sys.argv[1:])]),
              "epochs": a.epochs, "seconds": seconds, "compare": compare(curves["fp32"], curves["bf16"])}
    print("\n".join(report(result)))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, a.json)
        _plot(result, a.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
