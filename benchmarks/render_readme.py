"""Render the speed, MedMask and transfer figures of the docs pages (docs/*.md) from result files.

    python benchmarks/speed.py --only detection --threads 1 --json benchmarks/results/speed.json
    python benchmarks/profile_detector.py --threads 1 --json benchmarks/results/detector_profile.json
    python benchmarks/render_readme.py benchmarks/results/speed.json benchmarks/results/detector_profile.json
    python benchmarks/render_readme.py benchmarks/results/speed.json --print    # shows the text only

Accepts the result files of speed.py, profile_detector.py, bench_engine.py and bf16_curve.py; with
``--section medmask`` the ``results.json`` of medmask_ablation.py, between the ``<!-- medmask:begin -->``
and ``<!-- medmask:end -->`` markers; with ``--section transfer`` the ``results.json`` of run_all.py (the 2-D
pretraining table), with ``--section answer`` that file's answer line (into README.md), with ``--section
volumes`` that of run_all.py's 3-D table (configs/volumes.yaml) and ``--section volumes-answer`` its answer line,
with ``--section medmask-answer`` the MedMask ablation's answer lines (into README.md).

Only the text between the ``<!-- SECTION:begin -->`` and ``<!-- SECTION:end -->`` markers is replaced, in the
docs page that holds the section (``TARGETS``; ``--target`` names another file); the file is written atomically
(temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks import (
    bench_build,
    bench_detection,
    bench_engine,
    bench_predict,
    bf16_curve,
    medmask_ablation,
    medmask_expert_probe,
    profile_detector,
    report,
    stats,
)
from benchmarks.speed import report_mae, report_mae_runs

ROOT = Path(__file__).resolve().parents[1]

BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"

# The file that holds each section's markers (the README keeps a newcomer's page; the figures live in docs/).
TARGETS = {
    "speed": "docs/speed.md",
    "demo": "docs/medmask.md",
    "medmask": "docs/medmask.md",
    "transfer": "docs/transfer.md",
    "answer": "README.md",  # the 2-D table's answer line (run_all.py's results.json for configs/pretraining.yaml)
    "volumes": "docs/volumes.md",  # the 3-D table (run_all.py's results.json for configs/volumes.yaml)
    "volumes-answer": "README.md",  # its answer line, short
    "mae-runs": "docs/speed.md",
    "build": "docs/speed.md",
    "predict": "docs/medmask.md",  # benchmarks/bench_predict.py: full-size mammograms, time and memory per image
    "medmask-answer": "README.md",  # the MedMask ablation's answer lines (medmask_ablation.py's results.json), short
}


def render(result: dict, source: str) -> str:
    """Markdown for the figures in ``result`` (a speed.py results file read from ``source``)."""
    m = result["machine"]
    bf16 = "yes" if m.get("native_bf16") else "no"
    where = m["gpu"] if m.get("gpu") else f"{m['cpu']}, {m['cpus']} CPUs, flags {', '.join(m['cpu_flags']) or '-'}"
    commit = m["commit"] + (" with uncommitted changes in the checkout" if m.get("dirty") else "")
    lines = [f"`{source}`: measured {m['date']} on {where} (native bf16: {bf16}), torch {m['torch']}, "
             f"{m['threads']} threads, commit {commit}"
             + (f", by `{result['command']}`." if result.get("command") else ".")]
    det = result.get("detection")
    if det:
        rounds = " and ".join(f"{'/'.join(map(str, sorted(n)))} ({what})" for bench, what in (
            ("ms_deform_attn_fwd_bwd", "op"), ("ms_deform_attn_module_fwd_bwd", "layer"))
            if (n := {r["rounds"] for r in det if r["bench"] == bench}))
        lines += ["", "Deformable attention, forward + backward (4 levels at strides 8-64 of a square image, 256 "
                  "dims, 8 heads, 4 points): ours (`ms_deform_attn`, impl auto) vs HuggingFace transformers' "
                  f"pure-PyTorch `MultiScaleDeformableAttention`, interleaved in {rounds} "
                  "rounds; speed-up > 1: ours faster; the interval is the distribution-free 95% CI of the "
                  "median per-round ratio (it exists from 6 rounds on); CPU time counts only this process's "
                  "cycles.", ""]
        lines += bench_detection.report(det)
    if result.get("mae"):
        lines += ["", "MAE training step (speed-up of medssl over each peer, > 1: medssl faster):", ""]
        lines += report_mae(result["mae"], result["matmul_flops"])
    if result.get("bf16"):
        lines += ["", f"bf16: {result['bf16']['note']}."]
    if result.get("mae_bf16"):
        peak = result.get("matmul_flops_bf16", result["matmul_flops"])
        lines += ["", f"MAE training step under bf16 autocast (FLOP/s against the bf16 matmul peak, {peak / 1e9:.0f} "
                  "GFLOP/s):", ""] + report_mae(result["mae_bf16"], peak)
    if result.get("detector_profile"):
        lines += ["", "Where one detector training step spends its CPU time (`benchmarks/profile_detector.py`: "
                  "profiler time per part, a backward operator charged to the part whose forward created it):", ""]
        lines += profile_detector.report(result["detector_profile"])
    if result.get("results") and result.get("table"):  # bench_engine.py: the training loop, checkout vs checkout
        lines += ["", "Training loop, interleaved A/B of two checkouts (`benchmarks/bench_engine.py`):", ""]
        lines += [f"- {x}" for x in bench_engine.report(result)]
    if result.get("compare"):
        png = Path(source).with_suffix(".png")
        lines += [""] + bf16_curve.report(result)
        if (ROOT / png).is_file() or png.is_file():
            lines += ["", f"![bf16 and fp32 loss curves]({png.as_posix()})"]
    return "\n".join(lines).strip() + "\n"


def replace_section(text: str, body: str, section: str = "speed") -> str:
    """``text`` with the part between the ``<!-- section:begin -->`` / ``<!-- section:end -->`` markers
    replaced by ``body``; ValueError without exactly one pair."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"the file must contain one {begin} ... {end} pair")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body}{end}{tail}"


def render_demo(result: dict, source: str) -> str:
    """Markdown table of a MedMask run's ``summary.json`` (validation best epoch and held-out test per stage)."""
    test = result.get("test", {})
    run = result.get("_run") or {}  # how the run was made, added beside the copied summary
    rows = ["random_boxes"] + [k for k in result if k not in ("random_boxes", "test", "_run", "final")]
    where = f" ({run['command']}, {run['seconds'] / 60:.1f} min wall on {run['machine']})" if run else ""
    lines = [f"`{source}`{where}:", "", "| | val R@0.3 | val AP50 | test R@0.3 | test AP50 |",
             "|---|---|---|---|---|"]
    for row in rows:
        v, t = result.get(row) or {}, test.get(row) or {}
        cells = [f"{d[k]:.3f}" if k in d else "-" for d in (v, t) for k in ("R@0.3", "AP50")]
        lines.append(f"| {row.replace('_', ' ')} | " + " | ".join(cells) + " |")
    final = result.get("final")
    if final:
        lines += ["", f"Handed over as `final.pt`: {final['stage'].replace('_', ' ')} (the best stage on validation "
                      f"{final['select']}, {final['val']:.3f})."]
    return "\n".join(lines) + "\n"


def render_ablation(result: dict, source: str) -> str:
    """Markdown for a ``benchmarks/medmask_ablation.py`` results file (its table, diagnostics and FROC plot)."""
    png = Path(source).with_name("froc.png")
    lines = [f"`{source}` (commit {result['meta']['commit']}, {result['meta']['date']}):", ""]
    lines += medmask_ablation.report(result["table"], result["meta"], result.get("tables"), result.get("comparisons"),
                                     result.get("hand_over"))
    folder = Path(source).parent
    if (folder / "expert_probe.json").is_file():  # benchmarks/medmask_expert_probe.py, beside it
        probe = medmask_expert_probe.report(json.loads((folder / "expert_probe.json").read_text()))
        lines += ["", f"`{folder.as_posix()}/expert_probe.json` (`python benchmarks/medmask_expert_probe.py`): "
                  + probe[0]] + probe[1:]
    lines += ["", f"![FROC of every row on the target-domain test split]({png.as_posix()})"]
    return "\n".join(lines).strip() + "\n"


def render_transfer(result: dict, source: str) -> str:
    """Markdown for a ``benchmarks/run_all.py`` results.json: the answer (`stats.verdict_sentence`), then per task
    its summary table (label budgets x initialisations), the seed-paired comparisons with their intervals
    (`stats.claim`: a claim only where the interval excludes zero) and the curves PNG."""
    folder = Path(source).parent
    lines = [f"`{source}`: {result.get('header', '')}", ""]
    comps = stats.comparisons(result["cells"])  # recomputed from the cells: a claim follows from the results
    if stats.verdict_sentence(stats.verdict(comps)):
        lines += [f"**Answer:** {stats.verdict_sentence(stats.verdict(comps))}", ""]
    for task, info in result["tasks"].items():
        rows = [a for a in result["aggregated"] if a["task"] == task]
        if not rows:
            continue
        lines += [f"#### {task} ({info.get('kind', '')}; {info.get('data', '')})", "",
                  f"Splits: {info.get('samples')}; computed at commit {report.commits_summary(rows)}.", ""]
        lines += report.summary_table(rows)
        lines += ["Seed-paired differences on the test split (a claim only where the 95% interval excludes 0):",
                  ""] + report.paired_lines([c for c in comps if c["task"] == task]) + [""]
        png = folder / f"{task}_curves.png"
        if png.is_file() or (ROOT / png).is_file():
            lines += [f"![{task}: label-budget and pretraining-length curves]({png.as_posix()})", ""]
    return "\n".join(lines).strip() + "\n"


def render_answer(result: dict, source: str) -> str:
    """The README's short form of a ``benchmarks/run_all.py`` results.json: the file, what it holds and the answer
    (`stats.verdict_sentence`, recomputed from the cells); the tables and intervals are in its transfer section."""
    comps = stats.comparisons(result["cells"])
    head = result.get("header", "").split("\n")[0]
    return "\n".join([f"`{source}`: {head}", "", f"**Answer:** {stats.verdict_sentence(stats.verdict(comps))}"]) + "\n"


def render_medmask_answer(result: dict, source: str) -> str:
    """The README's short form of a ``benchmarks/medmask_ablation.py`` results.json: the file and, for each row of
    its config's ``answer``, the difference from each control under each selection rule (the full tables, every
    comparison and the pseudo-label diagnostics are in docs/medmask.md)."""
    meta = result["meta"]
    lines = medmask_ablation.answer(result.get("comparisons") or [], meta.get("answer") or [], meta,
                                    result.get("hand_over"))
    return "\n".join([f"`{source}` (commit {meta['commit']}, {meta['date']}, {meta['minutes'] / 60:.1f} h of "
                      "training summed over the cells' run times):", "", *lines]) + "\n"


def render_table(result: dict, source: str) -> str:
    """Markdown for a file of speed.py's MAE runs side by side (``runs``, section mae-runs) or of bench_build.py
    (``rows``, section build): the file and how it was made, then its table."""
    how = result.get("transcribed") or f"measured {result['machine']['date']}, commit {result['machine']['commit']}"
    table = bench_build.report(result) if "rows" in result else report_mae_runs([r["mae"] for r in result["runs"]])
    return "\n".join([f"`{source}`: {how}.", "", *table]) + "\n"


def render_predict(result: dict, source: str) -> str:
    """Markdown for a ``benchmarks/bench_predict.py`` file: where and how it was measured, then its table."""
    m = result["machine"]
    return "\n".join([f"`{source}`: measured {m['date']}, commit {m['commit']}, load average "
                      f"{m['load_avg'][0]:.1f} at the start.", "", *bench_predict.report(result)]) + "\n"


def render_file(path: Path, section: str = "speed") -> str:
    """The text one result file contributes to ``section`` (its part of the text between the markers)."""
    renderer = {"medmask": render_ablation, "demo": render_demo, "transfer": render_transfer,
                "volumes": render_transfer, "answer": render_answer, "volumes-answer": render_answer,
                "medmask-answer": render_medmask_answer,
                "mae-runs": render_table, "build": render_table, "predict": render_predict}.get(section, render)
    return renderer(json.loads(path.read_text()), str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+",
                        help="JSON files written by speed.py, profile_detector.py or bf16_curve.py --json")
    parser.add_argument("--target", "--readme", dest="target", type=Path, default=None,
                        help="the file whose markers to fill (default: the section's page in TARGETS)")
    parser.add_argument("--print", action="store_true", help="print the rendered text, do not write")
    parser.add_argument("--section", default="speed", choices=sorted(TARGETS),
                        help="markers to fill: speed (default), medmask (medmask_ablation results.json), "
                             "medmask-answer (its answer lines), demo (a MedMask run's summary.json), transfer / "
                             "answer / volumes / volumes-answer (run_all.py's results.json), mae-runs (speed.py MAE "
                             "runs side by side), build (bench_build.py's file) or predict (bench_predict.py's file)")
    args = parser.parse_args(argv)
    target = args.target or ROOT / TARGETS[args.section]
    parts = []
    for path in args.results:
        try:
            parts.append(render_file(path, args.section))
        except (OSError, json.JSONDecodeError, KeyError) as err:
            print(f"{path}: not a results file for the {args.section} section ({err!r})", file=sys.stderr)
            return 2
    body = "\n".join(parts)
    if args.print:
        print(body)
        return 0
    try:
        text = replace_section(target.read_text(), body, args.section)
    except ValueError as err:
        print(f"{target}: {err}", file=sys.stderr)
        return 2
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    print(f"rewrote the {args.section} section of {target} from {', '.join(map(str, args.results))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
