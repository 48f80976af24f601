"""Speed of multi-scale deformable attention (ours vs HuggingFace's pure-PyTorch form) and of the detector.

    python benchmarks/bench_detection.py                       # sweep 128/192/256/512/800 px, both cases
    python benchmarks/bench_detection.py --quick               # 128 and 256 px, fewer rounds
    python benchmarks/bench_detection.py --sizes 800 --rounds 9 --threads 1

Deformable-attention rows: forward + backward of the attention op alone, 4 levels at strides 8/16/32/64
of a square image, 256 dims, 8 heads, 4 points; the decoder case (300 queries) and the encoder case (one
query per token). Implementations (``ours`` is ``ms_deform_attn(impl="auto")``: the fused PyTorch path on
CPU, the Triton kernels on CUDA; ``reference`` our per-level ``grid_sample`` form; ``hf`` transformers'
``MultiScaleDeformableAttention``; on CUDA also ``fused`` and, when its extension is installed, the
official CUDA op ``MultiScaleDeformableAttention``) run in one process, interleaved round by round with
the order rotated; the per-round time ratio hf / ours is a paired comparison, reported as its median
with a distribution-free 95% CI (from 6 rounds), for wall time and for process CPU time (which does not
count time spent waiting for a shared core). Memory: on CPU the bytes autograd saves for the backward
pass (counted once per storage); on CUDA the allocator's peak during forward + backward.

Layer rows: the attention layer as a model runs it (value and output projections, sampling offsets and
attention logits from the query, softmax, sampling), ours (``MSDeformAttn``: the value projection fused
into the op, its input saved and the value recomputed in backward) against transformers'
``DeformableDetrMultiscaleDeformableAttention`` loaded with the same weights (outputs checked equal
first), forward + backward from the query and the encoder memory; in fp32 and, with ``--bf16`` (``speed.py``
does it where the CPU has native bf16), under bf16 autocast. The op alone cannot save less than its value
input (any backward of the locations needs it); the layer can, and that is where a model's memory goes.
Detector rows: training images/s of the demo-config detector on random 192-px images (fp32, and bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.timing_stats import median, median_ci
from medssl.detection.deformable_attn import level_starts, ms_deform_attn, ms_deform_attn_reference

SIZES = (128, 192, 256, 512, 800)
CASES = {"decoder": 300, "encoder": None}  # queries; None: one per token


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


def _official_cuda_op() -> Callable | None:
    """The official Deformable DETR CUDA op (``MultiScaleDeformableAttention`` extension), or None."""
    try:
        import MultiScaleDeformableAttention as msda  # built from the Deformable DETR repository's ops/
    except ImportError:
        return None

    class _Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, loc, attn):
            ctx.save_for_backward(value, shapes, starts, loc, attn)
            return msda.ms_deform_attn_forward(value, shapes, starts, loc, attn, 64)

        @staticmethod
        def backward(ctx, grad):
            value, shapes, starts, loc, attn = ctx.saved_tensors
            gv, gl, ga = msda.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad.contiguous(), 64)
            return gv, None, None, gl, ga

    def official(value, shapes, loc, attn):
        return _Op.apply(value, shapes, level_starts(shapes), loc, attn)

    return official


def implementations(device: torch.device) -> dict[str, Callable]:
    """The implementations compared on ``device`` (peers that are not installed are left out)."""
    impls: dict[str, Callable] = {"ours": ms_deform_attn, "reference": ms_deform_attn_reference}
    if device.type == "cuda":
        impls["fused"] = lambda *a: ms_deform_attn(*a, impl="fused")
        official = _official_cuda_op()
        if official is not None:
            impls["official_cuda"] = official
    hf = _hf_attention()
    if hf is not None:
        impls["hf"] = hf
    return impls


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages saved for backward while running ``fn``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def level_shapes(img: int, device: torch.device) -> torch.Tensor:
    """``(4, 2)`` (H, W) of the levels at strides 8 / 16 / 32 / 64 of a square ``img`` image."""
    return torch.tensor([[-(-img // s), -(-img // s)] for s in (8, 16, 32, 64)], device=device)


def attention_inputs(img: int, n_queries: int | None, device: torch.device) -> tuple:
    """value, spatial_shapes, locations, attention weights of a square ``img`` image (4 levels, 8 x 32)."""
    shapes = level_shapes(img, device)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    lq = s if n_queries is None else n_queries
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, s, 8, 32, generator=g).to(device).requires_grad_()
    loc = torch.rand(1, lq, 8, 4, 4, 2, generator=g).to(device).requires_grad_()
    attn = torch.rand(1, lq, 8, 4, 4, generator=g).softmax(-1).to(device).requires_grad_()
    return value, shapes, loc, attn


def _compare(impls: dict[str, Callable[[], torch.Tensor]], rounds: int, dev: torch.device) -> dict:
    """Interleaved forward + backward timing (order rotated per round) and memory of every implementation;
    per-round time ratios peer / ours (> 1: ours faster) with their median and 95% CI."""
    names = list(impls)
    rounds = -(-rounds // len(names)) * len(names)  # every implementation leads equally often
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}

    def step(fn: Callable[[], torch.Tensor]) -> None:
        fn().float().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for fn in impls.values():
        step(fn)  # warm-up (and Triton compilation)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            step(impls[k])
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    mem = {}
    for k, fn in impls.items():
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fn)
            mem[k] = torch.cuda.max_memory_allocated() - base
        else:
            mem[k] = saved_bytes(fn)
    row: dict = {"device": dev.type, "threads": torch.get_num_threads(), "rounds": rounds,
                 "memory_kind": "cuda_peak" if dev.type == "cuda" else "saved_for_backward"}
    for k in names:
        row[f"{k}_s"] = median(wall[k])
        row[f"{k}_cpu_s"] = median(cpu[k])
        row[f"{k}_mem_mb"] = mem[k] / 2**20
    for peer in [k for k in names if k != "ours"]:
        for kind, times in (("time", wall), ("cpu", cpu)):
            ratios = [p / o for p, o in zip(times[peer], times["ours"], strict=True)]  # > 1: ours faster
            row[f"{kind}_speedup_vs_{peer}"] = median(ratios)
            row[f"{kind}_speedup_vs_{peer}_ci95"] = median_ci(ratios)
            row[f"{kind}_faster_rounds_vs_{peer}"] = sum(x > 1 for x in ratios)
        row[f"mem_ratio_vs_{peer}"] = mem["ours"] / max(mem[peer], 1)
    return row


def bench_attention(img: int, case: str, rounds: int, device: str) -> dict:
    """The attention op alone (value, locations, attention weights in; output out), every implementation."""
    dev = torch.device(device)
    args = attention_inputs(img, CASES[case], dev)
    impls = {k: (lambda fn=fn: fn(*args)) for k, fn in implementations(dev).items()}
    return {"bench": "ms_deform_attn_fwd_bwd", "case": case, "img": img, "queries": args[2].shape[1],
            "tokens": args[0].shape[1], **_compare(impls, rounds, dev)}


def _hf_module(d_model: int = 256) -> torch.nn.Module | None:
    """transformers' ``DeformableDetrMultiscaleDeformableAttention`` (8 heads, 4 levels, 4 points), or None."""
    try:
        from transformers import DeformableDetrConfig
        from transformers.models.deformable_detr.modeling_deformable_detr import (
            DeformableDetrMultiscaleDeformableAttention,
        )
    except ImportError:
        return None
    return DeformableDetrMultiscaleDeformableAttention(
        DeformableDetrConfig(d_model=d_model, num_feature_levels=4, disable_custom_kernels=True), 8, 4)


def bench_module(img: int, case: str, rounds: int, device: str, bf16: bool = False) -> dict | None:
    """The attention layer as a model runs it (value / output projections, offsets, softmax, sampling): ours
    vs HF's module with the same weights, forward + backward from the query and the encoder memory;
    fp32, or bf16 autocast with ``bf16``. None when transformers is not installed."""
    from medssl.detection.deformable_attn import MSDeformAttn

    dev = torch.device(device)
    hf = _hf_module()
    if hf is None:
        return None
    g = torch.Generator().manual_seed(0)
    ours = MSDeformAttn(256, 4, 8, 4)
    with torch.no_grad():  # trained-looking weights: offsets and attention logits that vary by query
        ours.sampling_offsets.weight.normal_(0, 0.01, generator=g)
        ours.attention_weights.weight.normal_(0, 0.05, generator=g)
    hf.load_state_dict(ours.state_dict())
    ours, hf = ours.to(dev), hf.to(dev)
    shapes = level_shapes(img, dev)
    tokens = int((shapes[:, 0] * shapes[:, 1]).sum())
    lq = tokens if CASES[case] is None else CASES[case]
    memory = torch.randn(1, tokens, 256, generator=g).to(dev).requires_grad_()
    query = (memory.detach() + torch.randn(1, tokens, 256, generator=g).to(dev) if CASES[case] is None
             else torch.randn(1, lq, 256, generator=g).to(dev)).requires_grad_()
    ref = torch.rand(1, lq, 4, 2, generator=g).to(dev)
    shape_list = [tuple(x) for x in shapes.tolist()]
    starts = level_starts(shapes)
    ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def run_ours() -> torch.Tensor:
        with ctx():
            return ours(query, ref, memory, shapes)

    def run_hf() -> torch.Tensor:
        with ctx():
            return hf(query, encoder_hidden_states=memory, reference_points=ref, spatial_shapes=shapes,
                      spatial_shapes_list=shape_list, level_start_index=starts)[0]

    if not bf16:
        torch.testing.assert_close(run_ours(), run_hf(), rtol=1e-4, atol=1e-4)  # the same function
    return {"bench": "ms_deform_attn_module_fwd_bwd", "precision": "bf16" if bf16 else "fp32", "case": case,
            "img": img, "queries": lq, "tokens": tokens, **_compare({"ours": run_ours, "hf": run_hf}, rounds, dev)}


def bench_detector(repeats: int, device: str, bf16: bool = False) -> dict:
    """Training images/s of the demo detector (recipes/configs/medmask_demo.yaml sizes; batch 2, 192 px),
    fp32 or under bf16 autocast."""
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
    ctx = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with ctx():
            out = model(imgs)
            loss = sum(crit(out, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return {"bench": "detector_train", "config": "demo", "precision": "bf16" if bf16 else "fp32", "img": 192,
            "batch": 2, "device": device, "threads": torch.get_num_threads(), "images_per_s": 2 / median(times)}


def run(quick: bool, sizes: tuple[int, ...] | None = None, rounds: int | None = None,
        device: str | None = None, bf16: bool = False) -> list[dict]:
    """The deformable-attention sweep (every size, both cases: the op alone and the layer against HF's module,
    the latter also in bf16 autocast with ``bf16``) and the detector rows."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = sizes or ((128, 256) if quick else SIZES)
    rounds = rounds or (3 if quick else 9)
    rows = []
    for img in sizes:
        for case in CASES:
            for row in (bench_attention(img, case, rounds, device), bench_module(img, case, rounds, device),
                        bench_module(img, case, rounds, device, bf16=True) if bf16 else None):
                if row is not None:
                    rows.append(row)
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows.append(bench_detector(1 if quick else 3, device))
    if bf16:
        rows.append(bench_detector(1 if quick else 3, device, bf16=True))
    return rows


def _ci_text(row: dict, key: str) -> str:
    ci = row.get(f"{key}_ci95")
    return f"{row[key]:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _table(rows: list[dict], title: str) -> list[str]:
    mem_kind = "peak CUDA memory" if rows[0]["memory_kind"] == "cuda_peak" else "memory saved for backward"
    lines = [f"\n{title}\n", "| image | case (queries) | ours | HF | speed-up vs HF, wall: median [95% CI] | "
             f"rounds ours faster | speed-up, CPU time | {mem_kind}, ours vs HF |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['img']} px | {r['case']} ({r['queries']:,}) | {r['ours_s'] * 1e3:.1f} ms | "
                     f"{r['hf_s'] * 1e3:.1f} ms | {_ci_text(r, 'time_speedup_vs_hf')} | "
                     f"{r['time_faster_rounds_vs_hf']}/{r['rounds']} | {_ci_text(r, 'cpu_speedup_vs_hf')} | "
                     f"{r['ours_mem_mb']:.1f} vs {r['hf_mem_mb']:.1f} MB ({r['mem_ratio_vs_hf']:.2f}x) |")
    return lines


def report(rows: list[dict]) -> list[str]:
    """Markdown tables of the sweep (ours vs HF: time, CPU time, memory; the op, the layer in fp32 and in bf16)
    and the detector lines."""
    attn = [r for r in rows if r["bench"] == "ms_deform_attn_fwd_bwd" and "hf_s" in r]
    lines = []
    if attn:
        lines += _table(attn, "The attention op (value, locations, weights -> output), fp32:")
        others = sorted({k[len("time_speedup_vs_"):] for r in attn for k in r
                         if k.startswith("time_speedup_vs_") and not k.endswith("_ci95")} - {"hf"})
        for peer in others:
            ratios = ", ".join(f"{r['img']}/{r['case'][:3]} {r[f'time_speedup_vs_{peer}']:.2f}x" for r in attn)
            lines.append(f"\nSpeed-up of ours vs `{peer}` (median, wall): {ratios}.")
    for precision in ("fp32", "bf16"):
        mod = [r for r in rows if r["bench"] == "ms_deform_attn_module_fwd_bwd" and r["precision"] == precision]
        if mod:
            lines += _table(mod, f"The attention layer (`MSDeformAttn` vs HF's `DeformableDetrMultiscaleDeformable"
                                 f"Attention`, same weights; query + encoder memory -> output), {precision}:")
    det = {r.get("precision", "fp32"): r for r in rows if r["bench"] == "detector_train"}
    for precision, r in det.items():
        lines.append(f"\nDetector training, demo config ({r['img']} px, batch {r['batch']}, {r['device']}, "
                     f"{r['threads']} threads, {precision}): {r['images_per_s']:.2f} images/s"
                     + (f" ({r['images_per_s'] / det['fp32']['images_per_s']:.2f}x fp32)."
                        if precision != "fp32" and "fp32" in det else "."))
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"image sizes (default {SIZES})")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per size and case")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--bf16", action="store_true", help="also time the layer and the detector in bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.quick, tuple(args.sizes) if args.sizes else None, args.rounds, bf16=args.bf16)
    print("\n".join(report(result)))
