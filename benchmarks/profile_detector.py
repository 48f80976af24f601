"""Where one Deformable DETR training step spends its time on CPU, by part of the model, as JSON.

    python benchmarks/profile_detector.py --json benchmarks/results/detector_profile.json
    python benchmarks/profile_detector.py --configs demo --steps 2

Configs: ``demo`` (recipes/configs/medmask_demo.yaml: ResNet-10t, 64 wide, 2+2 layers, 30 queries, box
refinement, two-stage; batch 4 at 192 px) and ``reference`` (Deformable DETR's defaults: ResNet-50, 256
wide, 6+6 layers, 300 queries; batch 1 at 800 px). Random images and two boxes per image; the model is
built with ``build_detector`` and the loss with ``SetCriterion``. Under ``torch.profiler`` every operator
is charged to the innermost part it ran in (forward hooks open a labelled range per part); a backward
operator is charged to the part whose forward operator created it (the autograd sequence number links
the two). Parts: data (making the batch), backbone, input projection, encoder attention / rest, decoder
attention (the deformable cross-attention) / rest, heads and other model code, matcher, losses,
optimizer. Shares are of the profiled CPU time of the step (the profiler adds some overhead; ratios
between parts are what to read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.autograd.profiler import record_function

from benchmarks.speed import machine_info
from medssl.detection.criterion import SetCriterion
from medssl.detection.deformable_attn import MSDeformAttn
from medssl.detection.detr import DetrConfig, build_detector

CONFIGS = {
    "demo": (dict(backbone="resnet", backbone_name="resnet10t", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2,
                  dim_feedforward=256, dropout=0.0, num_queries=30, with_box_refine=True, two_stage=True), 4, 192),
    "reference": (dict(backbone="resnet", backbone_name="resnet50"), 1, 800),
}
PREFIX = "part::"


def _label_parts(model: nn.Module, crit: SetCriterion) -> list:
    """Forward hooks that open a ``part::NAME`` profiler range around each part; returns the hook handles."""
    parts: list[tuple[nn.Module, str]] = [(model.backbone, "backbone"), (crit.matcher, "matcher"),
                                          (crit, "losses")]
    parts += [(m, "input projection") for m in model.input_proj]
    for layer in model.transformer.encoder:
        parts += [(layer, "encoder rest")] + [(m, "encoder attention") for m in layer.modules()
                                                if isinstance(m, MSDeformAttn)]
    parts.append((model.transformer.decoder, "decoder rest"))
    parts += [(m, "decoder attention") for m in model.transformer.decoder.modules() if isinstance(m, MSDeformAttn)]
    handles = []
    for module, name in parts:
        ranges: list = []

        def pre(_m, _a, name=name, ranges=ranges):
            ranges.append(record_function(PREFIX + name))
            ranges[-1].__enter__()

        def post(_m, _a, _o, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _part_of(event, seq_part: dict[int, str]) -> str:
    """The innermost labelled part enclosing ``event``, or for backward work the part of its forward op."""
    e = event
    while e is not None:
        if e.name.startswith(PREFIX):
            return e.name[len(PREFIX):]
        if e.name.startswith("autograd::engine::evaluate_function"):
            return seq_part.get(e.sequence_nr, "heads and other model code")
        e = e.cpu_parent
    return "heads and other model code"


def breakdown(events) -> dict[str, dict[str, float]]:
    """Self CPU seconds per part, forward and backward apart, from profiler events."""
    seq_part: dict[int, str] = {}
    for e in events:  # forward ops that autograd recorded: sequence number -> part
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and not e.is_async:
            part = _part_of(e, {})
            if e.sequence_nr not in seq_part or part != "heads and other model code":
                seq_part[e.sequence_nr] = part
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"forward_s": 0.0, "backward_s": 0.0})
    for e in events:
        top = e
        backward = False
        while top is not None:
            if top.name.startswith("autograd::engine::evaluate_function"):
                backward = True
            top = top.cpu_parent
        name = _part_of(e, seq_part)
        out[name]["backward_s" if backward else "forward_s"] += e.self_cpu_time_total / 1e6
    return dict(out)


def profile_step(config: str, steps: int) -> dict:
    """Profile ``steps`` training steps (after one warm-up) of ``config``; the breakdown is their mean."""
    overrides, batch, size = CONFIGS[config]
    torch.manual_seed(0)
    cfg = DetrConfig(**overrides)
    model = build_detector(cfg).train()
    crit = SetCriterion(num_classes=cfg.num_classes)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    _label_parts(model, crit)

    def step() -> None:
        with record_function(PREFIX + "data"):
            images = torch.rand(batch, cfg.in_chans, size, size)
            targets = [{"labels": torch.zeros(2, dtype=torch.long),
                        "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.2, 0.1]])}] * batch
        losses = crit(model(images), targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with record_function(PREFIX + "optimizer"):
            opt.step()

    step()  # warm-up
    wall = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            wall.append(time.perf_counter() - t)
    parts = breakdown(prof.events())
    total = sum(p["forward_s"] + p["backward_s"] for p in parts.values())
    rows = {name: {"forward_s": p["forward_s"] / steps, "backward_s": p["backward_s"] / steps,
                   "share": (p["forward_s"] + p["backward_s"]) / total} for name, p in parts.items()}
    return {"config": config, "batch": batch, "img": size, "steps": steps, "threads": torch.get_num_threads(),
            "step_wall_s_profiled": sum(wall) / steps, "profiled_cpu_s": total / steps,
            "attn_impl": cfg.attn_impl, "parts": dict(sorted(rows.items(), key=lambda kv: -kv[1]["share"]))}


def report(rows: list[dict]) -> list[str]:
    """Markdown: one table per config, parts by share of the step."""
    lines = []
    for r in rows:
        lines += [f"{r['config']} config (batch {r['batch']}, {r['img']} px, {r['threads']} threads): "
                  f"{r['step_wall_s_profiled']:.2f} s per step under the profiler", "",
                  "| part | forward | backward | share of step |", "|---|---|---|---|"]
        for name, p in r["parts"].items():
            lines.append(f"| {name} | {p['forward_s']:.3f} s | {p['backward_s']:.3f} s | {p['share']:.0%} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for config in args.configs:
        rows.append(profile_step(config, args.steps))
        print("\n".join(report(rows[-1:])), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps({"machine": machine_info("cpu"), "detector_profile": rows}, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
