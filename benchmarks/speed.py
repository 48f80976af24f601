"""Speed against the peers a user would otherwise pick, measured in one run on this machine.

    python benchmarks/speed.py            # MAE step, data path, deformable attention + detector
    python benchmarks/speed.py --quick    # fewer repeats, CPU demo config only for the MAE step
    python benchmarks/speed.py --only mae

MAE training step (forward, backward, AdamW; batch 32; mask 0.75, norm_pix): medssl vs HuggingFace
`ViTMAEForPreTraining` configured identically vs an MAE built from timm blocks the way the official code
builds it. Each implementation runs in its own process (so that peak memory is its own), the rounds are
interleaved with the order rotated, and the best round counts. Reports images/s, ratios, achieved FLOP/s
as a fraction of the machine's measured matmul FLOP/s, and peak memory (RSS growth on CPU, allocator peak
on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (img, patch, in_chans, dim, depth, heads, dec_dim, dec_depth, dec_heads)
CONFIGS = {
    "vit_s16_224_dec256x4": (224, 16, 1, 384, 12, 6, 256, 4, 8),
    "demo_cpu_tiny8_64": (64, 8, 1, 192, 12, 3, 128, 2, 4),
}
IMPLS = ("medssl", "hf", "timm_official")
BATCH = 32


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def matmul_flops(device: str, n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s of this machine (the ceiling to compare against)."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _build(impl: str, cfg: tuple):
    img, patch, chans, dim, depth, heads, ddim, ddepth, dheads = cfg
    if impl == "medssl":
        from medssl.models.mae import MaskedAutoencoder

        return MaskedAutoencoder(img, patch, chans, dim, depth, heads, ddim, ddepth, dheads, norm_pix_loss=True)
    from benchmarks.mae_peers import build_peer

    return build_peer(impl, img, patch, chans, dim, depth, heads, ddim, ddepth, dheads, 0.75)


def worker(impl: str, config: str, steps: int, device: str) -> dict:
    """One implementation, one config, in this process: images/s, FLOPs per step, peak memory."""
    import torch
    import transformers.models.vit_mae  # noqa: F401  (every worker imports all three implementations before
    from torch.utils.flop_counter import FlopCounterMode

    import benchmarks.mae_peers  # noqa: F401  the baseline, so that import memory is not counted as peak)
    import medssl.models.mae  # noqa: F401

    torch.manual_seed(0)
    base_rss = _rss_mb()
    cfg = CONFIGS[config]
    model = _build(impl, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    x = torch.randn(BATCH, cfg[2], cfg[0], cfg[0], device=device)
    use_bf16 = device == "cuda"

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(x, mask_ratio=0.75)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        step()  # also the warm-up
    flops = fc.get_total_flops()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - base_rss
    return {"impl": impl, "config": config, "step_s": min(times), "images_per_s": BATCH / min(times),
            "flops_per_step": flops, "peak_mem_mb": peak, "device": device}


def bench_mae(configs: list[str], steps: int, rounds: int, device: str) -> list[dict]:
    """Interleaved rounds of every implementation, each in a fresh process; best round kept."""
    best: dict[tuple[str, str], dict] = {}
    for r in range(rounds):
        for config in configs:
            for impl in IMPLS[r % len(IMPLS):] + IMPLS[:r % len(IMPLS)]:  # rotate who runs first
                cmd = [sys.executable, __file__, "--worker", impl, config, str(steps), device]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
                if proc.returncode != 0:
                    print(f"[{impl} {config}] failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                key = (impl, config)
                if key not in best or row["step_s"] < best[key]["step_s"]:
                    best[key] = {**row, "peak_mem_mb": min(row["peak_mem_mb"],
                                                           best.get(key, row)["peak_mem_mb"])}
    return list(best.values())


def report_mae(rows: list[dict], peak_flops: float) -> list[str]:
    lines = ["| config | impl | images/s | vs medssl | FLOP/s achieved | of matmul peak | peak mem MB |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["config"], r["impl"]): r for r in rows}
    for config in CONFIGS:
        ours = by.get((config, "medssl"))
        for impl in IMPLS:
            r = by.get((config, impl))
            if r is None:
                continue
            ratio = ours["images_per_s"] / r["images_per_s"] if ours else float("nan")
            achieved = r["flops_per_step"] / r["step_s"]
            lines.append(f"| {config} | {impl} | {r['images_per_s']:.1f} | "
                         f"{'1.00' if impl == 'medssl' else f'medssl {ratio:.2f}x'} | "
                         f"{achieved / 1e9:.1f} G | {achieved / peak_flops:.0%} | {r['peak_mem_mb']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("mae", "data", "detection"), action="append")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, help="also write all rows to this JSON file")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, config, steps, device = args.worker
        print(json.dumps(worker(impl, config, int(steps), device)))
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    only = set(args.only or ("mae", "data", "detection"))
    out: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "device": device}}
    print(f"# medssl speed ({device}, {os.cpu_count()} CPUs, torch {torch.__version__})")
    if "mae" in only:
        peak = matmul_flops(device)
        out["matmul_flops"] = peak
        configs = ["demo_cpu_tiny8_64"] if args.quick else list(CONFIGS)
        rows = bench_mae(configs, steps=2 if args.quick else 4, rounds=1 if args.quick else 3, device=device)
        out["mae"] = rows
        print(f"\n## MAE training step, batch {BATCH} (measured matmul peak {peak / 1e9:.1f} GFLOP/s fp32)")
        print("\n".join(report_mae(rows, peak)))
    if "data" in only:
        from benchmarks import bench_data

        out["data"] = bench_data.run(args.quick)
        print("\n## Data path\n" + "\n".join(json.dumps(r) for r in out["data"]))
    if "detection" in only:
        from benchmarks import bench_detection

        out["detection"] = bench_detection.run(args.quick)
        print("\n## Deformable attention and detector\n" + "\n".join(json.dumps(r) for r in out["detection"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
