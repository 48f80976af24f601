"""Turn cell results into the paper-style tables (Markdown, CSV, JSON) and bar charts.

One table per task and label fraction, one row per (backbone, protocol), mean +- std over seeds.
The best mean of each metric column is bold. The last column says whether a pretrained row beats
its baselines on the task's main metric: a pretrained ViT BOTH (the from-scratch CNN and the random-init ViT
with the same protocol and labels), a pretrained CNN the same CNN from scratch; only then has pretraining
earned its place. Each table names the commit(s)
its cells were computed at (a cell's `commit`, see benchmarks/provenance.py; "+dirty": with uncommitted
changes to the code that computes it), and so does the CSV's `commits` column.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stats import PRIMARY, beats_both, claim, comparisons, verdict, verdict_sentence

METRICS = {"classification": [("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("auc", "AUC")],
           "segmentation": [("dice", "Dice"), ("iou", "IoU")],
           "detection": [("r@0.3", "R@0.3"), ("ap50", "AP50")]}


def fraction_label(f: float, n_train: int | None = None) -> str:
    """'8 labelled', '10 %' or 'all' for a label fraction."""
    if f == 1:
        return "all" + (f" ({n_train})" if n_train else "")
    return f"{int(f)} labelled" if f > 1 else f"{100 * f:g} %" + (f" ({n_train})" if n_train else "")


def commit_label(commit: str | None) -> str:
    """Short form of a cell's commit: 12 hex digits (+dirty), 'unknown' outside git, 'unrecorded' if absent."""
    if not commit:
        return "unrecorded"
    head, sep, tail = commit.partition("+")
    return commit if head == "unknown" else head[:12] + sep + tail


def commits_summary(agg: list[dict[str, Any]]) -> str:
    """'`abc` (3 cells), `def+dirty` (1 cell)': the commits of the cells behind aggregated rows."""
    counts = sum((Counter(a["commit_counts"]) for a in agg), Counter())
    return ", ".join(f"`{c}` ({n} cell{'s' * (n != 1)})" for c, n in sorted(counts.items()))


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group per-seed rows by (task, fraction, backbone row, protocol); mean, std and n over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["fraction"], r["row"], r["protocol"])].append(r)
    out = []
    for (task, frac, row, protocol), rs in groups.items():
        kind = rs[0]["kind"]
        agg = {"task": task, "kind": kind, "fraction": frac, "row": row, "protocol": protocol,
               "pretraining": rs[0]["pretraining"], "data": rs[0]["data"], "backbone": rs[0]["backbone"],
               "role": rs[0]["role"], "pretrain_epochs": rs[0].get("pretrain_epochs"), "seeds": len(rs),
               "n_train": rs[0]["n_train"],
               "seconds": float(np.mean([r["seconds"] for r in rs]))}
        agg["commit_counts"] = dict(sorted(Counter(commit_label(r.get("commit")) for r in rs).items()))
        agg["commits"] = " ".join(agg["commit_counts"])
        val = np.array([r.get("val_score", math.nan) for r in rs], dtype=float)
        agg["val"], agg["val_std"] = float(np.mean(val)), float(np.std(val, ddof=1)) if len(val) > 1 else 0.0
        for key, _ in METRICS[kind]:
            vals = np.array([r["metrics"].get(key, math.nan) for r in rs], dtype=float)
            agg[key] = float(np.mean(vals))
            agg[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def _beats(agg: list[dict[str, Any]], comps: list[dict[str, Any]]) -> None:
    """Set 'verdict' on every aggregated row (in place): does a pretrained row beat its baselines with seed-paired
    95% intervals above zero (`benchmarks.stats`)? A pretrained ViT: BOTH the random-init ViT with its protocol
    and the CNN; a pretrained CNN: the same CNN from scratch."""
    for a in agg:
        if a["role"] != "pretrained":
            a["verdict"] = "baseline"
            continue
        mine = [c for c in comps if (c["task"], c["fraction"], c["a"]["row"], c["a"]["protocol"]) ==
                (a["task"], a["fraction"], a["row"], a["protocol"])]
        roles = {c["b"]["role"] for c in mine}
        # a pretrained CNN's random-init twin is the from-scratch CNN row of its architecture: that one baseline
        cnn_twin = any(b["role"] == "cnn" and b["backbone"] == a["backbone"] and b["task"] == a["task"]
                       and b["fraction"] == a["fraction"] for b in agg)
        if not roles >= ({"cnn"} if cnn_twin else {"cnn", "random"}):
            a["verdict"] = "n/a (baseline missing)"
            continue
        worst = min(mine, key=lambda c: c["ci"][0])
        text = f"{worst['mean']:+.3f} [{worst['ci'][0]:+.3f}, {worst['ci'][1]:+.3f}] vs {worst['b']['name']}"
        won = all(c["decided"] and c["ci"][0] > 0 for c in mine) if cnn_twin else beats_both(mine)
        a["verdict"] = f"**yes**: {text}" if won else f"no: {text}"


def budgets(rows: list[dict[str, Any]]) -> list[float]:
    """The label budgets (fractions) of `rows` in order of labelled samples: "all" last."""
    n_of = {a["fraction"]: a["n_train"] for a in rows}
    return sorted(n_of, key=lambda f: (n_of[f], f))


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(row, protocol) pairs of a task in table order: CNN, random init, pretrained by pretraining epochs."""
    order = {"cnn": 0, "random": 1, "pretrained": 2}
    first = {}
    for a in rows:
        first.setdefault((a["row"], a["protocol"]), a)
    return sorted(first, key=lambda k: (order[first[k]["role"]], first[k].get("pretrain_epochs") or 0, k))


def _row_name(rows: list[dict[str, Any]], row: str, protocol: str) -> str:
    """A row's short name: its pretraining, else "<backbone> random init" / "<backbone> from scratch"."""
    a = next(r for r in rows if (r["row"], r["protocol"]) == (row, protocol))
    return {"pretrained": a["pretraining"], "random": f"{a['backbone']} random init"}.get(
        a["role"], f"{a['backbone']} from scratch")


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """One task's main metric, label budgets down and initialisations across (pretraining epochs in the header).

    The best mean of each budget is bold; "-" where a row has no cell at that budget. This holds the
    label-budget curve (read down a column) and the pretraining-length curve (read across a line).
    """
    key = PRIMARY[rows[0]["kind"]]
    cols = _columns(rows)
    by = {(a["fraction"], a["row"], a["protocol"]): a for a in rows}
    lines = [f"Main metric ({key}), mean ± std over seeds; columns in order of pretraining length:", "",
             "| Labels | " + " | ".join(f"{_row_name(rows, *c)}, {c[1]}" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    n_of = {a["fraction"]: a["n_train"] for a in rows}
    for frac in budgets(rows):
        hits = [by.get((frac, *c)) for c in cols]
        best = max((h[key] for h in hits if h is not None and not math.isnan(h[key])), default=math.nan)
        n_train = n_of[frac]
        cells = []
        for h in hits:
            if h is None or math.isnan(h[key]):
                cells.append("-" if h is None else "n/a")
                continue
            txt = f"{h[key]:.3f} ± {h[key + '_std']:.3f}"
            cells.append(f"**{txt}**" if h[key] == best else txt)
        lines.append(f"| {fraction_label(frac, n_train)} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(agg: list[dict[str, Any]], tasks: dict[str, dict[str, Any]], comps: list[dict[str, Any]]) -> str:
    """Markdown tables, one per task and label fraction, then the seed-paired comparisons of each task."""
    _beats(agg, comps)
    lines: list[str] = []
    order = {"cnn": 0, "random": 1, "pretrained": 2}
    for task in dict.fromkeys(a["task"] for a in agg):
        rows_t = [a for a in agg if a["task"] == task]
        kind = rows_t[0]["kind"]
        info = tasks.get(task, {})
        lines += [f"### {task} ({kind}; {info.get('data', '')})", ""]
        samples = info.get("samples")
        if samples:
            lines += [f"Splits: {samples}; main metric {PRIMARY[kind]}.", ""]
        pretrained_epochs = {a.get("pretrain_epochs") for a in rows_t if a["role"] == "pretrained"}
        if len({a["fraction"] for a in rows_t}) > 1 or len(pretrained_epochs) > 1:
            lines += summary_table(rows_t)
        for frac in budgets(rows_t):
            rows = sorted([a for a in rows_t if a["fraction"] == frac],
                          key=lambda a: (order[a["role"]], a["row"], a["protocol"]))
            cols = METRICS[kind]
            best = {k: max((r[k] for r in rows if not math.isnan(r[k])), default=math.nan) for k, _ in cols}
            lines.append(f"Labels: {fraction_label(frac, rows[0]['n_train'])}, seeds: {rows[0]['seeds']}; "
                         f"computed at commit {commits_summary(rows)}")
            lines.append("")
            head = (["Pre-training", "Data", "Backbone", "Protocol", "Validation"] + [n for _, n in cols]
                    + ["Beats its baselines (paired 95% CI, weakest)"])
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in rows:
                cells = [r["pretraining"], r["data"], r["backbone"], r["protocol"],
                         f"{r['val']:.3f} ± {r['val_std']:.3f}" if not math.isnan(r["val"]) else "n/a"]
                for k, _ in cols:
                    txt = f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if not math.isnan(r[k]) else "n/a"
                    cells.append(f"**{txt}**" if r[k] == best[k] and not math.isnan(r[k]) else txt)
                cells.append(r["verdict"])
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        mine = [c for c in comps if c["task"] == task]
        if mine:
            lines += ["Seed-paired differences (main metric, test split):", ""] + paired_lines(mine) + [""]
    return "\n".join(lines)


def paired_lines(comps: list[dict[str, Any]]) -> list[str]:
    """One bullet per comparison (`benchmarks.stats.claim`), low label budgets first."""
    order = sorted(comps, key=lambda c: (c["fraction"] == 1, c["n_train"], c["a"]["row"], c["a"]["protocol"],
                                         c["b"]["role"]))
    return [f"- {claim(c)}" for c in order]


def write_csv(agg: list[dict[str, Any]], path: Path) -> None:
    """All aggregated rows as CSV (metric columns of every task kind)."""
    keys = ["task", "kind", "fraction", "n_train", "pretraining", "data", "backbone", "protocol", "role",
            "seeds", "seconds", "verdict", "commits", "val", "val_std"]
    metric_keys = [k for kind in METRICS.values() for k, _ in kind]
    keys += [m for k in metric_keys for m in (k, k + "_std")]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for a in agg:
            w.writerow({k: a.get(k, "") for k in keys})


def bar_charts(agg: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per task: main metric per row, grouped by label fraction, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in dict.fromkeys(a["task"] for a in agg):
        rows = [a for a in agg if a["task"] == task]
        key = PRIMARY[rows[0]["kind"]]
        fracs = budgets(rows)
        names = list(dict.fromkeys(f"{a['row']} {a['protocol']}" for a in rows))
        width = 0.8 / max(1, len(names))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(fracs) * len(names) * 0.5), 4))
        for j, name in enumerate(names):
            means, stds = [], []
            for f in fracs:
                hit = [a for a in rows if a["fraction"] == f and f"{a['row']} {a['protocol']}" == name]
                means.append(hit[0][key] if hit else np.nan)
                stds.append(hit[0][key + "_std"] if hit else 0.0)
            ax.bar(np.arange(len(fracs)) + j * width, means, width, yerr=stds, capsize=3, label=name)
        ax.set_xticks(np.arange(len(fracs)) + width * (len(names) - 1) / 2)
        ax.set_xticklabels([fraction_label(f) for f in fracs])
        ax.set_ylabel(key)
        ax.set_title(task)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = folder / f"{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def length_series(rows: list[dict[str, Any]], fraction: float, key: str) -> list[tuple[int, float, float]]:
    """(pretraining epochs, mean, std) of one task's fine-tuned ViT rows at one label budget that sit on the
    pretraining-length curve: the pretrained rows that record `epochs` and, at 0, the random-init row of THEIR
    architecture only (a lever with another ViT, e.g. patch 4, brings its own random-init twin, also at 0)."""
    on_curve = [a for a in rows if a["fraction"] == fraction and a["protocol"] == "finetune"
                and a.get("pretrain_epochs") is not None and a["role"] != "cnn"]
    archs = {a["backbone"] for a in on_curve if a["role"] == "pretrained"}
    return sorted((a["pretrain_epochs"], a[key], a[key + "_std"]) for a in on_curve
                  if a["role"] == "pretrained" or a["backbone"] in archs)


def curve_charts(agg: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per task with two panels, error bars = std over seeds.

    Left: main metric against labelled samples, a line per (row, protocol) with at least two budgets.
    Right: main metric against pretraining epochs (0 = random init), a line per label budget over the
    fine-tuned ViT rows that record their epochs; the from-scratch CNN at that budget as a dashed line.
    A task with neither line (one label budget, one pretraining length: the 3-D tables) gets no PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in dict.fromkeys(a["task"] for a in agg):
        rows = [a for a in agg if a["task"] == task]
        key = PRIMARY[rows[0]["kind"]]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        drawn = 0
        for row, protocol in _columns(rows):
            pts = sorted((a["n_train"], a[key], a[key + "_std"]) for a in rows
                         if (a["row"], a["protocol"]) == (row, protocol))
            if len(pts) > 1:
                n, m, sd = zip(*pts)
                left.errorbar(n, m, yerr=sd, marker="o", capsize=3,
                              label=f"{_row_name(rows, row, protocol)} ({protocol})")
                drawn += 1
        left.set_xscale("log", base=2)
        left.set_xlabel("labelled training samples")
        left.set_ylabel(key)
        left.set_title(f"{task}: label budget")
        if drawn:
            left.legend(fontsize=7)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, frac in enumerate(budgets(rows)):
            vit = length_series(rows, frac, key)
            if len(vit) < 2:
                continue
            c = colours[i % len(colours)]
            ep, m, sd = zip(*vit)
            n_train = next(a["n_train"] for a in rows if a["fraction"] == frac)
            right.errorbar(ep, m, yerr=sd, marker="o", capsize=3, color=c, label=f"{fraction_label(frac, n_train)}")
            drawn += 1
            for a in rows:
                if a["fraction"] == frac and a["role"] == "cnn":
                    right.axhline(a[key], color=c, linestyle="--", linewidth=1)
        lengths = sorted({a["pretrain_epochs"] for a in rows if a.get("pretrain_epochs") is not None})
        if lengths:  # annealed runs of 0 (random init) to a few hundred epochs: a linear axis, ticks at the runs
            right.set_xticks(lengths)
            right.set_xlim(-0.05 * max(lengths[-1], 1), 1.08 * max(lengths[-1], 1))
        right.set_xlabel("MAE pretraining epochs (0 = random init); dashed: CNN from scratch")
        right.set_ylabel(key)
        right.set_title(f"{task}: pretraining length (fine-tuned ViT)")
        if right.get_legend_handles_labels()[0]:
            right.legend(fontsize=7, title="labels", title_fontsize=7)
        if not drawn:  # nothing against labels or pretraining length: the bar chart shows the task
            plt.close(fig)
            continue
        fig.tight_layout()
        path = folder / f"{task}_curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_all(rows: list[dict[str, Any]], tasks: dict[str, dict[str, Any]], folder: Path,
              header: str = "") -> dict[str, Path]:
    """Write results.md / results.csv / results.json and the charts; return their paths."""
    agg = aggregate(rows)
    comps = comparisons(rows)
    answer = verdict(comps)
    md = markdown(agg, tasks, comps)
    header = (header + "\n\n" if header else "") + f"Cells computed at commit {commits_summary(agg)}."
    folder.mkdir(parents=True, exist_ok=True)
    answer_line = f"**Answer:** {verdict_sentence(answer)}\n\n" if verdict_sentence(answer) else ""
    (folder / "results.md").write_text(header + "\n\n" + answer_line + md + "\n")
    write_csv(agg, folder / "results.csv")
    (folder / "results.json").write_text(json.dumps({"header": header, "tasks": tasks, "aggregated": agg,
                                                     "comparisons": comps, "verdict": answer, "cells": rows},
                                                    indent=1, default=float))
    charts = bar_charts(agg, folder) + curve_charts(agg, folder)
    return {"md": folder / "results.md", "csv": folder / "results.csv", "json": folder / "results.json",
            **{p.stem: p for p in charts}}
