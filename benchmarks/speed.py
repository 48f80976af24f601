"""Speed against the peers a user would otherwise pick, measured in one run on this machine.

    python benchmarks/speed.py            # MAE step, data path, deformable attention + detector
    python benchmarks/speed.py --quick    # fewer repeats, CPU demo config only for the MAE step
    python benchmarks/speed.py --only mae
    python benchmarks/speed.py --only detection --json benchmarks/results/speed.json   # then:
    python benchmarks/render_readme.py benchmarks/results/speed.json                   # docs/speed.md figures

MAE training step (forward, backward, AdamW; batch 32; mask 0.75, norm_pix): medssl vs HuggingFace
`ViTMAEForPreTraining` configured identically vs an MAE built from timm blocks the way the official code
builds it, each with the AdamW its users get (medssl's Engine: fused where possible; HF Trainer's default
`adamw_torch_fused`; the official script's `torch.optim.AdamW`). Speed: the three run in one process, their
steps interleaved in rounds with the order rotated, so that a shared machine's drifts hit all alike; the
per-round ratio is a paired comparison, reported as its median with a distribution-free 95% confidence
interval (order statistics; from 6 rounds on): an interval that holds 1.0 means no measurable difference at
this noise level. The same for forward + backward alone (the model without the optimizer). Peak memory:
each implementation in its own fresh process (RSS growth on CPU, allocator peak on CUDA). Also the achieved
FLOP/s as a fraction of the machine's measured matmul FLOP/s.

Every result file records the date, the machine (CPU model and the flags that decide its speed: avx2,
avx512f, avx512_bf16, amx_bf16), torch and the git commit, so that a figure says where it came from.
bf16: on a CPU that computes it natively (AVX512-BF16 or AMX) or on CUDA, ``--bf16 auto`` (default) also
times the MAE step under bf16 autocast for all three implementations; elsewhere it records that the
machine has no native bf16 and skips it (``--bf16 on`` forces it, e.g. to check the code path).
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

from benchmarks.timing_stats import median, median_ci

ROOT = Path(__file__).resolve().parents[1]

# name: (img, patch, in_chans, dim, depth, heads, dec_dim, dec_depth, dec_heads)
CONFIGS = {
    "vit_s16_224_dec256x4": (224, 16, 1, 384, 12, 6, 256, 4, 8),
    "demo_cpu_tiny8_64": (64, 8, 1, 192, 12, 3, 128, 2, 4),
}
IMPLS = ("medssl", "hf", "timm_official")
BATCH = 32


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM; `ru_maxrss` survives exec and so can carry the
    parent's peak into a fresh worker)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def matmul_flops(device: str, n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Measured matmul FLOP/s of this machine in ``dtype`` (the ceiling to compare against)."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
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


def _optimizer(impl: str, model):
    """The AdamW each user gets: medssl's Engine, HF Trainer's default, the official MAE script's."""
    import torch

    from medssl.train.optim import make_adamw, param_groups

    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, 0.05)]
    if impl == "medssl":
        return make_adamw(groups, lr=1e-4, betas=(0.9, 0.95))
    if impl == "hf":  # transformers' Trainer defaults to optim="adamw_torch_fused" with torch >= 2.8
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))  # official main_pretrain.py


def _stepper(impl: str, config: str, device: str, bf16: bool = False):
    """A model, its optimizer and a closure running one training step on a fixed batch (bf16 autocast if
    ``bf16``; on CUDA always, as before)."""
    import torch

    torch.manual_seed(0)
    cfg = CONFIGS[config]
    model = _build(impl, cfg).to(device)
    opt = _optimizer(impl, model)
    x = torch.randn(BATCH, cfg[2], cfg[0], cfg[0], device=device)
    use_bf16 = bf16 or device == "cuda"

    def step() -> float:
        """One step; returns the seconds of forward + backward (the model's share, without the optimizer)."""
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(x, mask_ratio=0.75)[0]
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        fwd_bwd = time.perf_counter() - t
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return fwd_bwd

    return step


def memory_worker(impl: str, config: str, device: str) -> dict:
    """Peak memory of one implementation in this (fresh) process: RSS growth on CPU, allocator peak on CUDA."""
    import torch
    import transformers.models.vit_mae  # noqa: F401  (every worker imports all three implementations before

    import benchmarks.mae_peers  # noqa: F401  the baseline, so that import memory is not counted as peak)
    import medssl.models.mae  # noqa: F401

    base_rss = peak_rss_mb()
    step = _stepper(impl, config, device)
    step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb() - base_rss
    return {"impl": impl, "config": config, "peak_mem_mb": peak}


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> list[str]:
    """The speed-deciding flags of this CPU among avx2, avx512f, avx512_bf16, amx_bf16 (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in ("avx2", "avx512f", *BF16_FLAGS) if f in flags]


def machine_info(device: str) -> dict:
    """Date, machine, versions and commit that a result file carries."""
    import torch

    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    flags = cpu_flags()

    def git(*a: str) -> str:
        proc = subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "platform": platform.platform(),
            "cpu": model, "cpus": os.cpu_count(), "cpu_flags": flags,
            "native_bf16": device == "cuda" or any(f in flags for f in BF16_FLAGS),
            "torch": torch.__version__, "triton": triton_version, "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "threads": torch.get_num_threads(), "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


def time_interleaved(config: str, rounds: int, steps: int, device: str, bf16: bool = False) -> list[dict]:
    """All implementations in one process, their steps interleaved round by round (order rotated).

    Slow drifts of a shared machine (frequency, neighbours) then hit every implementation alike, and the
    per-round ratio against medssl is a paired comparison: its median and spread are what is reported.
    """
    from torch.utils.flop_counter import FlopCounterMode

    steppers, flops = {}, {}
    for impl in IMPLS:
        steppers[impl] = _stepper(impl, config, device, bf16)
        with FlopCounterMode(display=False) as fc:
            steppers[impl]()  # also the warm-up
        flops[impl] = fc.get_total_flops()
        steppers[impl]()
    per_round: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    fb_round: dict[str, list[float]] = {impl: [] for impl in IMPLS}  # forward + backward only
    for r in range(rounds):
        for impl in IMPLS[r % len(IMPLS):] + IMPLS[:r % len(IMPLS)]:
            t, fb = time.perf_counter(), 0.0
            for _ in range(steps):
                fb += steppers[impl]()
            per_round[impl].append((time.perf_counter() - t) / steps)
            fb_round[impl].append(fb / steps)
    rows = []
    for impl in IMPLS:
        ratios = [p / o for p, o in zip(per_round[impl], per_round["medssl"], strict=True)]  # >1: medssl faster
        fb_ratios = [p / o for p, o in zip(fb_round[impl], fb_round["medssl"], strict=True)]
        step_s = median(per_round[impl])
        rows.append({"impl": impl, "config": config, "step_s": step_s, "images_per_s": BATCH / step_s,
                     "round_step_s": per_round[impl], "round_fwd_bwd_s": fb_round[impl],
                     "medssl_speedup_median": median(ratios), "medssl_speedup_ci95": median_ci(ratios),
                     "medssl_faster_rounds": sum(r > 1 for r in ratios), "rounds": rounds,
                     "model_speedup_median": median(fb_ratios), "model_speedup_ci95": median_ci(fb_ratios),
                     "flops_per_step": flops[impl], "device": device,
                     "precision": "bf16" if bf16 or device == "cuda" else "fp32"})
    return rows


def bench_mae(configs: list[str], steps: int, rounds: int, device: str) -> list[dict]:
    """Speed from interleaved in-process rounds; peak memory from one fresh process per implementation."""
    rows = []
    for config in configs:
        timed = {r["impl"]: r for r in time_interleaved(config, rounds, steps, device)}
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--memory-worker", impl, config, device]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                print(f"[{impl} {config}] memory worker failed: {proc.stderr.strip().splitlines()[-1:]}",
                      file=sys.stderr)
                mem = float("nan")
            else:
                mem = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mem_mb"]
            rows.append({**timed[impl], "peak_mem_mb": mem})
    return rows


def _ratio_text(median: float, ci: list[float] | tuple[float, float] | None) -> str:
    return f"{median:.3f}x" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " (too few rounds for a CI)")


def report_mae(rows: list[dict], peak_flops: float) -> list[str]:
    lines = ["| config | impl | images/s (median round) | medssl speed-up, whole step: median [95% CI] | rounds "
             "medssl faster | model only (fwd + bwd) | FLOP/s achieved | of matmul peak | peak mem MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        achieved = r["flops_per_step"] / r["step_s"]
        ours = r["impl"] == "medssl"
        vs = "" if ours else _ratio_text(r["medssl_speedup_median"], r["medssl_speedup_ci95"])
        model = "" if ours else _ratio_text(r["model_speedup_median"], r["model_speedup_ci95"])
        faster = "" if ours else f"{r['medssl_faster_rounds']}/{r['rounds']}"
        lines.append(f"| {r['config']} | {r['impl']} | {r['images_per_s']:.1f} | {vs} | {faster} | {model} | "
                     f"{achieved / 1e9:.1f} G | {achieved / peak_flops:.0%} | {r['peak_mem_mb']:.0f} |")
    return lines


MAE_LABELS = {"vit_s16_224_dec256x4": "ViT-S/16, 224, decoder 256 x 4",
              "demo_cpu_tiny8_64": "CPU demo, ViT-Ti/8, 64, decoder 128 x 2"}
PEER_LABELS = {"hf": "HF `ViTMAEForPreTraining`", "timm_official": "timm blocks, official MAE code"}


def report_mae_runs(runs: list[list[dict]]) -> list[str]:
    """One table for several runs of the MAE step (each run: the ``mae`` rows of a results file): per config and
    peer, medssl's whole-step speed-up per run, the model-only medians and the peak memory of both sides."""
    n = range(1, len(runs) + 1)
    lines = ["| config | peer | " + " | ".join(f"whole step, run {i} (rounds medssl faster)" for i in n)
             + f" | model only, {' / '.join(f'run {i}' for i in n)} | peak memory medssl vs peer, "
             + " / ".join(f"run {i}" for i in n) + " |", "|---|---|" + "---|" * (len(runs) + 2)]
    first = runs[0]
    for config in dict.fromkeys(r["config"] for r in first):
        ours = [next(r for r in run if r["config"] == config and r["impl"] == "medssl") for run in runs]
        for k, impl in enumerate(dict.fromkeys(r["impl"] for r in first if r["config"] == config and
                                               r["impl"] != "medssl")):
            peer = [next(r for r in run if r["config"] == config and r["impl"] == impl) for run in runs]
            steps = [f"{_ratio_text(r['medssl_speedup_median'], r['medssl_speedup_ci95'])}, "
                     f"{r['medssl_faster_rounds']}/{r['rounds']}" for r in peer]
            model = " / ".join(f"{r['model_speedup_median']:.3f}x" for r in peer)
            memory = " / ".join(f"{o['peak_mem_mb']:.0f} vs {r['peak_mem_mb']:.0f} MB" for o, r in zip(ours, peer))
            label = MAE_LABELS.get(config, config) if k == 0 else ""
            lines.append(f"|{f' {label} ' if label else ' '}| {PEER_LABELS.get(impl, impl)} | " + " | ".join(steps)
                         + f" | {model} | {memory} |")
    speeds = [f"{MAE_LABELS.get(c, c).split(',')[0]} " + " / ".join(
        f"{next(r for r in run if r['config'] == c and r['impl'] == 'medssl')['images_per_s']:.1f}" for run in runs)
        for c in dict.fromkeys(r["config"] for r in first)]
    return lines + ["", f"medssl's images/s (median round), {' / '.join(f'run {i}' for i in n)}: "
                    + ", ".join(speeds) + "."]


def bf16_plan(mode: str, info: dict) -> tuple[bool, str]:
    """Whether to time bf16 (``mode`` auto / on / off) on this machine, and the sentence that says why."""
    where = "CUDA" if info["device"] == "cuda" else f"CPU flags: {', '.join(info['cpu_flags']) or 'none found'}"
    if mode == "off":
        return False, "bf16 comparison not requested (--bf16 off)"
    if mode == "on" and not info["native_bf16"]:
        return True, f"bf16 forced on a machine without native bf16 ({where}): expect it slower than fp32"
    if info["native_bf16"]:
        return True, f"native bf16 ({where}): bf16 autocast timed beside fp32"
    return False, (f"no native bf16 on this machine ({where}; needs avx512_bf16 or amx_bf16): "
                   "bf16 comparison skipped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("mae", "data", "detection"), action="append")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, help="also write all rows to this JSON file")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per config (default: MAE 15, detection 9; --quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image sizes of the deformable-attention sweep (default 128 192 256 512 800)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="time the MAE step in bf16 autocast too: auto = where the machine has native bf16")
    parser.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        impl, config, device = args.memory_worker
        print(json.dumps(memory_worker(impl, config, device)))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    only = set(args.only or ("mae", "data", "detection"))
    info = machine_info(device)
    out: dict = {"machine": info, "command": " ".join(["python", "benchmarks/speed.py", *(argv or sys.argv[1:])])}
    print(f"# medssl speed ({device}, {info['cpu']}, {info['cpus']} CPUs, flags {info['cpu_flags']}, "
          f"torch {info['torch']}, commit {info['commit']}{' + changes' if info['dirty'] else ''})")
    if "mae" in only:
        peak = matmul_flops(device)
        out["matmul_flops"] = peak
        configs = ["demo_cpu_tiny8_64"] if args.quick else list(CONFIGS)
        rounds = args.rounds or (3 if args.quick else 15)
        rounds = -(-rounds // len(IMPLS)) * len(IMPLS)  # every implementation leads equally often
        steps = 1 if args.quick else 2
        rows = bench_mae(configs, steps=steps, rounds=rounds, device=device)
        out["mae"] = rows
        print(f"\n## MAE training step, batch {BATCH} (measured matmul peak {peak / 1e9:.1f} GFLOP/s fp32)")
        print("\n".join(report_mae(rows, peak)))
        run_bf16, why = bf16_plan(args.bf16, info)
        out["bf16"] = {"timed": run_bf16 and device == "cpu", "note": why}
        print(f"\n{why}")
        if run_bf16 and device == "cpu":  # on CUDA the rows above are bf16 already
            bf_rows = [r for c in configs for r in time_interleaved(c, rounds, steps, device, bf16=True)]
            for r in bf_rows:
                r["peak_mem_mb"] = float("nan")  # memory is measured for fp32 only
                fp32 = next(x for x in rows if x["impl"] == r["impl"] and x["config"] == r["config"])
                r["bf16_speedup_over_fp32"] = fp32["step_s"] / r["step_s"]
            out["mae_bf16"] = bf_rows
            out["matmul_flops_bf16"] = peak_bf16 = matmul_flops(device, n=1024, repeats=3, dtype="bfloat16")
            print(f"\n## MAE training step, bf16 autocast (measured bf16 matmul peak {peak_bf16 / 1e9:.1f} GFLOP/s)\n"
                  + "\n".join(report_mae(bf_rows, peak_bf16)))
    if "data" in only:
        from benchmarks import bench_data

        out["data"] = bench_data.run(args.quick)
        print("\n## Data path\n" + "\n".join(json.dumps(r) for r in out["data"]))
    if "detection" in only:
        from benchmarks import bench_detection

        sizes = tuple(args.sizes) if args.sizes else None
        run_bf16, why = bf16_plan(args.bf16, info)
        out["detection_bf16"] = {"timed": run_bf16, "note": why}
        print(why)
        out["detection"] = bench_detection.run(args.quick, sizes, args.rounds, device, bf16=run_bf16)
        print("\n## Deformable attention and detector\n" + "\n".join(bench_detection.report(out["detection"])))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
