"""Speed of multi-scale deformable attention (ours vs HuggingFace's pure-PyTorch form) and of the detector.

    python benchmarks/bench_detection.py            # full Deformable DETR sizes (800-px image)
    python benchmarks/bench_detection.py --quick    # small sizes, seconds

Deformable-attention rows: forward + backward of the attention op alone, 4 levels at strides 8/16/32/64
of a square image, 256 dims, 8 heads, 4 points; the decoder case (300 queries) and the encoder case (one
query per token). Time is the minimum over interleaved repeats; ``*_cpu_s`` is the process CPU time of
the same runs (with ``--threads 1`` it does not count time spent waiting for a shared core); memory is
the peak CUDA allocation on GPU, and on CPU the bytes of the tensors autograd saves for the backward
pass (the activation memory training must hold), counted once per storage.
Detector row: training images/s of the demo-config detector on random 192-px images.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from medssl.detection.deformable_attn import ms_deform_attn_fused, ms_deform_attn_reference


def _hf_attention() -> Callable | None:
    """HuggingFace transformers' pure-PyTorch multi-scale deformable attention, or None if absent."""
    try:
        from transformers.models.deformable_detr.modeling_deformable_detr import (
            MultiScaleDeformableAttention,
        )
    except ImportError:
        return None
    mod = MultiScaleDeformableAttention()

    def hf(value, shapes, loc, attn):
        return mod(value, shapes, [tuple(s) for s in shapes.tolist()], None, loc, attn, 64)

    return hf


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages saved for backward while running ``fn``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _step(fn: Callable, args: tuple) -> None:
    out = fn(*args)
    out.sum().backward()
    if args[0].is_cuda:
        torch.cuda.synchronize()


def bench_attention(img: int, n_queries: int | None, repeats: int, device: str) -> dict:
    """Time and memory of forward+backward for ours, the reference form and HuggingFace's."""
    dev = torch.device(device)
    shapes = torch.tensor([[-(-img // s), -(-img // s)] for s in (8, 16, 32, 64)], device=dev)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    lq = s if n_queries is None else n_queries
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, s, 8, 32, generator=g).to(dev).requires_grad_()
    loc = torch.rand(1, lq, 8, 4, 4, 2, generator=g).to(dev).requires_grad_()
    attn = torch.rand(1, lq, 8, 4, 4, generator=g).softmax(-1).to(dev).requires_grad_()
    args = (value, shapes, loc, attn)
    impls = {"ours": ms_deform_attn_fused, "reference": ms_deform_attn_reference}
    hf = _hf_attention()
    if hf is not None:
        impls["hf"] = hf
    times = {k: float("inf") for k in impls}
    cpu = {k: float("inf") for k in impls}
    for fn in impls.values():
        _step(fn, args)  # warm-up
    for _ in range(repeats):
        for k, fn in impls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            _step(fn, args)
            times[k] = min(times[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    mem = {}
    for k, fn in impls.items():
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _step(fn, args)
            mem[k] = torch.cuda.max_memory_allocated() - base
        else:
            mem[k] = _saved_bytes(lambda fn=fn: fn(*args))
    row = {"bench": "ms_deform_attn_fwd_bwd", "case": "encoder" if n_queries is None else "decoder",
           "img": img, "queries": lq, "tokens": s, "device": device,
           "threads": torch.get_num_threads(), "memory_kind": "cuda_peak" if dev.type == "cuda" else
           "saved_for_backward"}
    for k in impls:
        row[f"{k}_s"] = round(times[k], 4)
        row[f"{k}_cpu_s"] = round(cpu[k], 4)
        row[f"{k}_mem_mb"] = round(mem[k] / 2**20, 1)
    if "hf" in impls:
        row["speedup_vs_hf"] = round(times["hf"] / times["ours"], 2)
        row["cpu_speedup_vs_hf"] = round(cpu["hf"] / cpu["ours"], 2)
        row["mem_ratio_vs_hf"] = round(mem["ours"] / max(mem["hf"], 1), 2)
    return row


def bench_detector(repeats: int, device: str) -> dict:
    """Training images/s of the demo detector (recipes/configs/medmask_demo.yaml sizes; batch 2, 192 px)."""
    from medssl.detection.criterion import SetCriterion
    from medssl.detection.detr import build_detector, demo_detector_config

    torch.manual_seed(0)
    cfg = demo_detector_config(backbone_name="resnet10t", num_queries=30, dim_feedforward=256, with_box_refine=True)
    model = build_detector(cfg).to(device)
    crit = SetCriterion(num_classes=cfg.num_classes)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    imgs = torch.rand(2, 1, 192, 192, device=device)
    targets = [{"labels": torch.zeros(2, dtype=torch.long, device=device),
                "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.2, 0.1]], device=device)}] * 2
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = model(imgs)
        loss = sum(crit(out, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            best = min(best, time.perf_counter() - t0)
    return {"bench": "detector_train", "config": "demo", "img": 192, "batch": 2, "device": device,
            "threads": torch.get_num_threads(), "images_per_s": round(2 / best, 2)}


def run(quick: bool) -> list[dict]:
    """Run all detection benchmarks; ``quick`` uses a 256-px image and fewer repeats."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    img, repeats = (256, 2) if quick else (800, 3)
    rows = [bench_attention(img, 300, repeats, device), bench_attention(img, None, repeats, device)]
    rows.append(bench_detector(1 if quick else 3, device))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for r in run(args.quick):
        print(json.dumps(r))
