"""What each MedMask stage adds on the target domain: the ablation table over generated sets and seeds, one command.

    python benchmarks/medmask_ablation.py --config benchmarks/configs/medmask.yaml
    python benchmarks/medmask_ablation.py --config benchmarks/configs/medmask.yaml --data-seeds 0 --seeds 0 \
        --rows source_only "oracle (source + target labels)"
    python benchmarks/medmask_ablation.py --config benchmarks/configs/medmask.yaml --report   # tables from the cache
    python benchmarks/medmask_ablation.py --config benchmarks/configs/medmask.yaml --split calib  # calibration

Rows (the config's ``rows``; each names the stages it trains, in order, its config overrides, the ``control``
(one row or a list) it is compared with and, optionally, the ``selection`` rules it runs under): random boxes;
``source_only``; the controls (stage 2's schedule without any target term, the same with the target batches
forwarded in train mode so that BatchNorm statistics adapt, and with the statistics frozen); + the feature MAE
alone; + the distillation alone (each mode); the full stage 2 and its variants; stage 3 (teaching), its control
without the pseudo-label loss and its published options; a row may name another ``expert`` (embeddings extracted
once into ``demo/embeddings_<expert>``) or score the recipe's hand-over (``hand_over: true``: the stage of its
chain that ``final.pt`` would hold); and an oracle (source + target labels, as long as the longest row: only a
generated set can offer it). Every row is trained with the recipe's code (`medssl.detection.stages.train_stage`)
on the recipe's config (``recipe``, default ``recipes/configs/medmask_demo.yaml``) and scored once on the
target-domain test split: FROC R@0.3, mean sensitivity over the FROC points, COCO AP50.

Protocol. Every row runs on each generated set (``data_seeds``: the generator's ``--seed``, with the arguments
of ``demo``, e.g. a 160-image test split; under ``DATA_ROOT/seed<g>``) with each training seed (``seeds``).
Two model-selection rules are reported side by side (``selection``): ``best`` (each stage hands on its best
epoch on the labelled target validation split: the reference's rule, which uses target labels) and ``last``
(no selection: the last epoch). Each row is compared with its ``control`` by paired differences over the
(set, seed) runs and over the sets' means (`benchmarks.stats.paired`: t-interval, sign test). Generator knobs
are calibrated on the ``calib`` split (``--split calib`` scores every row there instead, results under
``OUT_calib``; the stage runs are shared with the test run), never on test.

Stage runs are shared (`benchmarks.medmask_cells`): a stage is trained once per seed for a given chain of stage
configs and the weights handed into it (the ``source_only`` run feeds every stage-2 row of its seed, under both
rules; the ``best`` and ``last`` chains share a run wherever the earlier stage handed on the same weights) and kept
under ``OUT/stages/<key>/``; a row's result is a cached cell (``OUT/cells/<key>.json``) keyed by its resolved
config, seed, the demo set's arguments and the fingerprint of the cells' code (`benchmarks.provenance`; the
tables and plots here are outside it), so a re-run after a change to that code recomputes and an interrupted run
continues where it stopped. Teaching rows log the pseudo-labels' precision / recall against the target pool's
true boxes per epoch (``eval.pseudo_truth``: a diagnostic, never a training signal).

Writes ``OUT/results.json`` / ``results.md`` (mean +- std over runs, both selection rules, the paired
comparisons), ``OUT/froc.png`` (every row's FROC on the test split, reference rule, sensitivity averaged over
runs) and ``OUT/config.resolved.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import stats
from benchmarks.medmask_cells import CODE_ENTRIES, FPI_GRID, ROOT, demo_argv, run_config, run_row
from benchmarks.provenance import cached_cell, cell_key, code_files, code_fingerprint, git_commit
from medssl.config import read_yaml

log = logging.getLogger("medssl")
RULES = {"best": "target validation (reference)", "last": "none (last epoch)"}  # eval.checkpoint values
METRIC = "R@0.3"


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]], cells: dict[tuple[str, Any], dict[str, Any]], seeds: list[Any]
              ) -> list[dict[str, Any]]:
    """Per row: mean and std over seeds (or any run units, e.g. (set, seed) pairs) of R@0.3, mean sensitivity
    and AP50, the mean FROC, pseudo-label P/R."""
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


def controls(row: dict[str, Any]) -> list[str]:
    """The names of the rows ``row`` is compared with (its ``control``: none, one name or a list)."""
    c = row.get("control")
    return [] if not c else [c] if isinstance(c, str) else list(c)


def compare(rows: list[dict[str, Any]], cells: dict[tuple[str, Any, int, str], dict[str, Any]],
            metric: str = METRIC) -> list[dict[str, Any]]:
    """Each row with a ``control`` against it, per selection rule: `stats.paired` over the (set, seed) runs both
    have (unit ``run``) and, with two or more sets, over the per-set means of the seeds both have there (unit
    ``set``: the runs of one set share its images, so the set-level interval is the one that covers a new
    generated set).

    Args:
        rows: the config's rows.
        cells: results keyed ``(row name, data seed, training seed, rule)``.
    """
    runs = [{"row": r, "protocol": rule, "seed": (g, s), "metrics": c["summary"]}
            for (r, g, s, rule), c in cells.items()]
    n_sets = len({g for _, g, _, _ in cells})
    out = []
    for row in rows:
        for control in controls(row):
            for rule in dict.fromkeys(k[3] for k in cells):
                a, b = {"row": row["name"], "protocol": rule}, {"row": control, "protocol": rule}
                units = [("run", runs)]
                if n_sets > 1:  # each set's mean over the seeds both rows have there (paired within the set)
                    pairs: dict[Any, list[tuple[float, float]]] = {}
                    for (r, g, s, rr), c in cells.items():
                        other = cells.get((control, g, s, rule))
                        if r == row["name"] and rr == rule and other is not None:
                            pairs.setdefault(g, []).append((float(c["summary"][metric]),
                                                            float(other["summary"][metric])))
                    units.append(("set", [{"row": name, "protocol": rule, "seed": g,
                                           "metrics": {metric: float(np.mean([p[i] for p in v]))}}
                                          for g, v in pairs.items() for i, name in enumerate((row["name"], control))]))
                for unit, data in units:
                    res = stats.paired(data, a, b, metric)
                    if res["seeds"]:
                        out.append({"row": row["name"], "control": control, "rule": rule, "unit": unit,
                                    "metric": metric, **res, "seeds": [list(u) if isinstance(u, tuple) else u
                                                                       for u in res["seeds"]]})
    return out


def prefix_rows(rows: list[dict[str, Any]], row: dict[str, Any]) -> list[str] | None:
    """The rows that are ``row``'s earlier stages, in order: for each shorter chain, the row that trains exactly
    those stages with ``row``'s overrides minus those of its later stages (keys starting ``<stage>.``; every other
    key, ``data.*``, ``distill.*``, ``model.*``, reaches every stage) and, from stage 2 on (where distillation
    reads them), the same expert's embeddings, so that it shares the stage runs ``row`` starts from; None where
    one is missing."""
    stages, own = list(row.get("stages") or []), row.get("set") or {}
    out = []
    for k in range(1, len(stages)):
        later = tuple(f"{s}." for s in stages[k:])
        want = {key: v for key, v in own.items() if not key.startswith(later)}
        match = [r["name"] for r in rows if list(r.get("stages") or []) == stages[:k] and (r.get("set") or {}) == want
                 and (k == 1 or r.get("expert") == row.get("expert")) and not r.get("hand_over")]
        if not match:
            return None
        out.append(match[0])
    return out


def derived_hand_overs(rows: list[dict[str, Any]], cells: dict[tuple[str, Any, int, str], dict[str, Any]],
                       select: str = METRIC, trained_too: bool = False
                       ) -> tuple[list[dict[str, Any]], dict[tuple[str, Any, int, str], Any]]:
    """What ``final.pt`` would be for every teaching row (target-validation selection), read from the cells
    alone: the stage of its chain best on validation (`medssl.detection.stages.handed_stage` on the cells'
    ``val_best``) and that stage's test figures, as a row ``"final.pt of <row>"`` (``hand_over``, its control the
    chain's stage-2 row) and its cells. The recipe's own ``hand_over`` row scores the same checkpoint by training
    (they agree: tested); these cover the teaching variants the default may be switched to, and skip the chain a
    ``hand_over`` row already scores (unless ``trained_too``)."""
    from medssl.detection.stages import handed_stage

    new_rows, out = [], {}
    for row in rows:
        stages = list(row.get("stages") or [])
        prefix = prefix_rows(rows, row) if stages[-1:] == ["teaching"] and not row.get("hand_over") else None
        trained = any(r.get("hand_over") and r.get("stages") == row["stages"] and r.get("expert") == row.get("expert")
                      and (r.get("set") or {}) == (row.get("set") or {}) for r in rows)
        if stages[-1:] == ["teaching"] and not row.get("hand_over") and not prefix:
            log.warning("no rows train the earlier stages of %r: no final.pt read for it", row["name"])
        if not prefix or (trained and not trained_too):
            continue
        new_rows.append({"name": f"final.pt of {row['name']}", "hand_over": True, "control": prefix[-1],
                         "derived": True})
        for (r, g, s, rule), c in cells.items():
            chain = [cells.get((name, g, s, rule)) for name in prefix] + [c]
            if r != row["name"] or rule != "best" or any(x is None for x in chain):
                continue
            bests = {stage: x.get("val_best") or {} for stage, x in zip(stages, chain)}
            pick = handed_stage(bests, stages, select, rule)
            out[(f"final.pt of {row['name']}", g, s, rule)] = {**chain[stages.index(pick)], "handed_stage": pick}
    return new_rows, out


def hand_over(rows: list[dict[str, Any]], cells: dict[tuple[str, Any, int, str], dict[str, Any]],
              comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each ``hand_over`` row, its control and rule: per (set, seed) run, the stage ``final.pt`` held (from its
    cell) and the difference from the control (the run-level comparison's, `compare`), with how many runs fall
    below it and the smallest difference (an interval that includes 0 does not say "never below": these counts
    do)."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for c in comparisons:
        if c["unit"] != "run" or not by_name.get(c["row"], {}).get("hand_over"):
            continue
        runs = [{"set": g, "seed": s, "handed": cells[(c["row"], g, s, c["rule"])].get("handed_stage", "?"),
                 "diff": d} for (g, s), d in zip(c["seeds"], c["diffs"])]
        last = (by_name.get(c["control"], {}).get("stages") or ["-"])[-1]
        out.append({"row": c["row"], "control": c["control"], "rule": c["rule"], "metric": c["metric"], "runs": runs,
                    "below": sum(d < 0 for d in c["diffs"]), "worst": min(c["diffs"]),
                    "handed": dict(sorted(Counter(x["handed"] for x in runs).items())),
                    "held_control": sum(x["handed"] == last for x in runs)})
    return out


def hand_over_sentence(h: dict[str, Any]) -> str:
    """One line: which stage final.pt held in how many runs, how many fall below the control, the worst."""
    n = len(h["runs"])
    held = ", ".join(f"{stage} in {k}" for stage, k in h["handed"].items())
    below = (f"below it in {h['below']} of {n} (smallest difference {h['worst']:+.3f})" if h["below"] else
             f"below it in none of {n}")
    same = h.get("held_control", 0)
    note = (f" (in the {same} run{'s' * (same != 1)} where it held {h['control']}'s own checkpoint the difference is 0 "
            "by construction)" if same else "")
    return (f"`{h['row']}` vs {h['control']} ({RULES.get(h['rule'], h['rule'])}): final.pt held {held} of {n} runs; "
            f"{h['metric']} {below}{note}.")


def choose_default(cells: dict[tuple[str, Any, int, str], dict[str, Any]], rule: dict[str, Any] | None
                   ) -> dict[str, Any] | None:
    """The config's ``teaching_default`` rule applied to (calib) cells: each candidate row's mean R@0.3 (its last
    stage, not its ``final.pt``) over the (set, seed) runs every candidate has under target-validation selection;
    the highest wins if it is above ``current``'s by more than ``margin`` (a decision rule, not a test), else
    ``current`` stays. None without a rule or a run common to all candidates."""
    if not rule:
        return None
    names = list(dict.fromkeys(rule["candidates"]))
    runs = [set((g, s) for (r, g, s, rr) in cells if r == name and rr == "best") for name in names]
    common = sorted(set.intersection(*runs), key=str) if runs else []
    if not common or rule["current"] not in names:
        return None
    means = {name: float(np.mean([cells[(name, g, s, "best")]["summary"][METRIC] for g, s in common]))
             for name in names}
    best = max(means, key=lambda r: (means[r], r == rule["current"]))
    margin = float(rule.get("margin", 0))
    return {"chosen": best if means[best] > means[rule["current"]] + margin else rule["current"],
            "current": rule["current"], "margin": margin, "means": means, "runs": len(common)}


def choice_sentence(c: dict[str, Any]) -> str:
    """The teaching default the rule picks, with every candidate's mean."""
    figures = ", ".join(f"{row} {m:.3f}" for row, m in c["means"].items())
    verdict = (f"`{c['chosen']}` (the current default stays)" if c["chosen"] == c["current"] else
               f"`{c['chosen']}` (its mean is above the current default's, `{c['current']}`, by more than the margin)")
    return (f"Teaching default by the config's rule (each candidate's mean {METRIC} over the {c['runs']} runs all "
            f"have, target-validation selection; the highest wins by more than {c['margin']:.2f}, a decision rule, "
            f"not a test): {verdict}; {figures}.")


def report(table: list[dict[str, Any]], meta: dict[str, Any], tables: dict[str, list[dict[str, Any]]] | None = None,
           comparisons: list[dict[str, Any]] | None = None, handed: list[dict[str, Any]] | None = None) -> list[str]:
    """Markdown: the ablation table (reference selection), both selection rules side by side (``tables``, per
    rule), the paired comparisons with their controls, what the recipe handed over (``handed``, `hand_over`) and
    the pseudo-label diagnostics."""
    sets = [g for g in meta.get("data_seeds") or [] if g is not None]
    where = (f"{meta['test_images']} images, {meta['test_lesions']} lesions" if len(sets) < 2 else
             f"per generated set {meta['test_images']} images, {meta['test_lesions']} lesions; {len(sets)} sets x "
             f"{meta['seeds']} seeds")
    lines = [f"MedMask ablation on the target-domain {meta.get('split', 'test')} split ({where}), CPU demo scale, "
             "mean +- std over runs (n per row) "
             f"({meta['minutes']:.0f} min summed over the cells' run times{_machines(meta)}); `{meta['command']}`:", "",
             "| row | n | R@0.3 | mean sensitivity (FROC points) | AP50 |", "|---|---|---|---|---|"]
    for e in table:
        cells = " | ".join(f"{e[m][0]:.3f} +- {e[m][1]:.3f}" for m in ("R@0.3", "mean_sensitivity", "AP50"))
        lines.append(f"| {e['row']} | {e['seeds']} | {cells} |")
    if tables and len(tables) > 1:
        rules = list(tables)
        lines += ["", "Model selection side by side (R@0.3, mean +- std; each stage hands on the checkpoint the rule "
                  "picks):", "", "| row | " + " | ".join(RULES.get(r, r) for r in rules) + " |",
                  "|---|" + "---|" * len(rules)]
        by_rule = {r: {e["row"]: e for e in t} for r, t in tables.items()}
        for name in dict.fromkeys(e["row"] for t in tables.values() for e in t):
            vals = [by_rule[r].get(name) for r in rules]
            lines.append(f"| {name} | " + " | ".join(f"{v[METRIC][0]:.3f} +- {v[METRIC][1]:.3f} (n {v['seeds']})"
                                                     if v else "-" for v in vals) + " |")
    if comparisons:  # the sets the set-level comparisons rest on (fewer than asked while a run is incomplete)
        counts = [len(c["seeds"]) for c in comparisons if c["unit"] == "set"]
        n = max(counts, default=1)
        fewer = " (fewer where a row lacks a set: each line's n)" if min(counts, default=n) < n else ""
        cover = ("The runs of one set share its images, so the `run` interval covers new seeds on these sets only and "
                 "is the optimistic one; the `set` interval (one mean per set, "
                 f"{n - 1} degree{'s' * (n > 2)} of freedom with {n} sets{fewer}; its sign test cannot go below "
                 f"p = {min(1.0, 2 * 0.5 ** n):.2g}) is the one that covers a new generated set. " if n > 1 else
                 "One generated set: the intervals cover new seeds on it only. ")
        lines += ["", f"Paired differences in {comparisons[0]['metric']}, row minus its control (95% t-interval; "
                  "unit `run`: each (generated set, training seed); unit `set`: the sets' means; **better** or "
                  f"**worse** only where the interval excludes 0). {cover}Each line is one test at 95%, with no "
                  "correction for the number of lines:", "",
                  "| row | control | selection | unit | n | difference | 95% CI | up / down | sign test p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            lo, hi = c["ci"]
            verdict = ("**better**" if lo > 0 else "**worse**") if c["decided"] else "no difference shown"
            lines.append(f"| {c['row']} | {c['control']} | {RULES.get(c['rule'], c['rule'])} | {c['unit']} | "
                         f"{len(c['seeds'])} | {c['mean']:+.3f} ({verdict}) | [{lo:+.3f}, {hi:+.3f}] | "
                         f"{c['up']} / {c['down']} | {c['p_sign']:.2g} |")
    for h in handed or []:
        lines += ["", hand_over_sentence(h)]
    if meta.get("teaching_default"):
        lines += ["", choice_sentence(meta["teaching_default"])]
    histories: dict[str, list[str]] = {}  # rows that share their teaching runs (the hand-over row) share a line
    for e in table:
        if e.get("pseudo_labels"):
            histories.setdefault(json.dumps(e["pseudo_labels"], sort_keys=True), []).append(e["row"])
    for history, names in histories.items():
        named = [f"`{n}`" for n in names]
        who = " and ".join([", ".join(named[:-1]), named[-1]] if len(named) > 1 else named)
        lines += ["", f"Pseudo-labels of {who} against the target pool's true "
                  "boxes (IoU >= 0.5), per teaching epoch: " + "; ".join(
                      f"epoch {i}: precision {_num(p['pseudo_precision'][0])}, recall {_num(p['pseudo_recall'][0])}, "
                      f"{p['pseudo_per_image'][0]:.2f} per image" for i, p in enumerate(json.loads(history))) + "."]
    return lines


def answer(comparisons: list[dict[str, Any]], questions: list[str], meta: dict[str, Any],
           handed: list[dict[str, Any]] | None = None) -> list[str]:
    """The README's short form: for each row named in ``questions`` (the config's ``answer``), each of its
    controls, the difference under each selection rule at the widest unit computed (``set`` where some comparison
    spans two or more generated sets, else ``run``), with its 95% interval, verdict and how many sets / runs it
    rests on out of the protocol's."""
    sets = [g for g in meta.get("data_seeds") or [] if g is not None]
    unit = "set" if any(c["unit"] == "set" and len(c["seeds"]) > 1 for c in comparisons) else "run"
    want = {"set": len(sets) or 1, "run": (len(sets) or 1) * meta["seeds"]}
    lines = []
    for row in questions:
        found = [c for c in comparisons if c["row"] == row and c["unit"] == unit]
        for control in dict.fromkeys(c["control"] for c in found):
            parts = []
            for c in (c for c in found if c["control"] == control):
                lo, hi = c["ci"]
                verdict = ("**better**" if lo > 0 else "**worse**") if c["decided"] else "no difference shown"
                runs = next((len(d["seeds"]) for d in comparisons if d["unit"] == "run" and d["row"] == row
                             and d["control"] == control and d["rule"] == c["rule"]), 0)
                count = f"over {len(c['seeds'])} of {want[unit]} {unit}s" + (
                    f", {runs} of {want['run']} runs" if unit == "set" else "")
                parts.append(f"{RULES.get(c['rule'], c['rule'])}: {c['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}], {verdict} "
                             f"({count})")
            lines.append(f"- **{row}** vs {control}: " + "; ".join(parts) + ".")
            lines += [f"  {hand_over_sentence(h)}" for h in handed or [] if h["row"] == row and h["control"] == control]
    if not lines:
        return []
    per = "the generated sets' means (the interval that covers a new set)" if unit == "set" else "the runs"
    return [f"Difference in {comparisons[0]['metric']} on the target {meta.get('split', 'test')} split, row minus its "
            f"control, over {per}, 95% t-interval, per model-selection rule; each line is one test at 95% with no "
            "correction for their number:", "", *lines]


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


def _machines(meta: dict[str, Any]) -> str:
    """Where the cells ran: cells per CPU kind and thread count, or the reporting machine for results from before
    that was kept."""
    by = meta.get("cells_by_cpu")
    if not by or set(by) == {"-"}:
        return f" on {meta['machine']}"

    def name(key: str) -> str:
        kind, _, threads = key.partition("/")
        where = "unrecorded CPUs" if kind == "-" else f"{kind.upper().replace('_', '-')} CPUs"
        return where + (f" at {threads} thread{'s' * (threads != '1')}" if threads else "")

    return "; cells computed on " + ", ".join(f"{name(k)}: {n}" for k, n in by.items())


def _by_cpu(cells: Any) -> dict[str, int]:
    """How many cells each CPU kind and thread count computed, as ``"<kind>/<threads>"`` (the kind is its widest
    vector flag: the last of `benchmarks.speed.cpu_flags`, which lists them narrowest first; "-" for cells from
    before it was stored)."""
    out: dict[str, int] = {}
    for c in cells:
        flags = c.get("cpu_flags")
        kind = "-" if flags is None else flags[-1] if flags else "other"
        key = f"{kind}/{c['threads']}" if c.get("threads") else kind
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def _report_config(spec: dict[str, Any], row: dict[str, Any], seed: int, data_seed: Any, rule: str) -> dict[str, Any]:
    """`run_config` for reading cached cells only: an expert row's embeddings folder is named, not made (making it
    trains that expert: minutes to tens of minutes for a report that trains nothing). The name repeats
    `run_config`'s ``embeddings_<expert>``; it lives here because medmask_cells.py is in the cells' code
    fingerprint (moving it there would orphan every cached cell): fold it in at the next change to that file."""
    if not row.get("expert"):
        return run_config(spec, row, seed, data_seed, rule)
    cfg = run_config(spec, {k: v for k, v in row.items() if k != "expert"}, seed, data_seed, rule)
    cfg["data"]["embeddings"] = str(Path(cfg["data"]["embeddings"]).with_name(f"embeddings_{row['expert']}"))
    return cfg


def _span(values: set[int]) -> str:
    """"160" for one value, "79-81" for several."""
    return str(min(values)) if len(values) == 1 else f"{min(values)}-{max(values)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "benchmarks" / "configs" / "medmask.yaml")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: the config's `out`)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the config's)")
    p.add_argument("--data-seeds", type=int, nargs="+", default=None,
                   help="generated sets (generator seeds; default: the config's `data_seeds`)")
    p.add_argument("--rows", nargs="+", default=None, help="row names to run (default: all)")
    p.add_argument("--selection", nargs="+", choices=list(RULES), default=None,
                   help="model-selection rules (default: the config's `selection`)")
    p.add_argument("--split", default="test",
                   help="split to score: test (default) or calib (to calibrate the generator's knobs)")
    p.add_argument("--report", action="store_true", help="only write the tables from cached cells")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = read_yaml(a.config.read_text())
    spec["set"] = {**(spec.get("set") or {}), "eval.test_split": a.split}
    out = a.out or ROOT / spec.get("out", "benchmarks/results/medmask")
    work = out  # stage runs live here whatever split is scored: a calibration run reuses the test run's stages
    if a.split != "test":
        out = out.with_name(f"{out.name}_{a.split}")
    seeds = a.seeds or list(spec.get("seeds", [0, 1, 2]))
    data_seeds: list[int | None] = a.data_seeds or list(spec.get("data_seeds") or [None])
    rules = a.selection or list(spec.get("selection") or ["best"])
    rows = [r for r in spec["rows"] if a.rows is None or r["name"] in a.rows]
    files = code_files(list(CODE_ENTRIES))
    fingerprint = code_fingerprint(files)
    commit = git_commit(files)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from benchmarks.speed import cpu_flags

    machine = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads()}  # stored with each new cell
    cells: dict[tuple[str, Any, int, str], dict[str, Any]] = {}
    for g in data_seeds:
        root = Path(run_config(spec, rows[0], seeds[0], g)["data"]["data_root"])  # generates the set if missing
        demo_args = json.loads((root / "demo" / "_info.json").read_text())["args"]
        for seed in seeds:
            for row in rows:
                for rule in [r for r in rules if r in row.get("selection", rules)]:
                    cfg = _report_config(spec, row, seed, g, rule) if a.report else run_config(spec, row, seed, g, rule)
                    what = {k: v for k, v in row.items() if k not in ("control", "selection")}  # pairing, which rules
                    key = cell_key(row=what, seed=seed, data_seed=g, rule=rule, config=cfg, demo=demo_args,
                                   code=fingerprint)
                    if a.report:
                        f = out / "cells" / f"{key}.json"
                        if f.is_file():
                            cells[(row["name"], g, seed, rule)] = json.loads(f.read_text())
                        continue
                    log.info("row %r set %s seed %d selection %s", row["name"], g, seed, rule)
                    res, cached = cached_cell(
                        out / "cells", key, lambda cfg=cfg, row=row: run_row(cfg, row, work, fingerprint),
                        meta={"row": row["name"], "seed": seed, "data_seed": g, "rule": rule,
                              "fingerprint": fingerprint, "commit": commit, **machine})
                    cells[(row["name"], g, seed, rule)] = res
                    log.info("row %r set %s seed %d selection %s%s: %s", row["name"], g, seed, rule,
                             " (cached)" if cached else "",
                             {k: round(v, 3) for k, v in res["summary"].items() if k in ("R@0.3", "AP50")})
    units = [(g, s) for g in data_seeds for s in seeds]
    tables = {rule: aggregate(rows, {(r, (g, s)): c for (r, g, s, rr), c in cells.items() if rr == rule}, units)
              for rule in rules}
    table = tables[rules[0]]
    if not table:
        print("no finished cells")
        return 1
    # final.pt of each teaching variant, from the cells, by the metric the recipe selects with (its eval.select)
    derived_rows, derived = derived_hand_overs(rows, cells, select=cfg["eval"]["select"])
    all_rows, all_cells = rows + derived_rows, {**cells, **derived}
    comparisons = compare(all_rows, all_cells)
    handed = hand_over(all_rows, all_cells, comparisons)
    from benchmarks.speed import machine_info
    from medssl.data.coco import build_dataset

    sizes, lesions = set(), set()
    for g in data_seeds:
        cfg_g = run_config(spec, rows[0], seeds[0], g, rules[0])
        test = build_dataset("demo", cfg_g["eval"]["test_split"], cfg_g["data"]["data_root"])
        sizes.add(len(test))
        lesions.add(sum(len(test.gt_boxes_xyxy(i)) for i in range(len(test))))
    m = machine_info("cpu")
    meta = {"seeds": len(seeds), "data_seeds": data_seeds, "selection": rules, "split": a.split,
            "test_images": _span(sizes), "test_lesions": _span(lesions),
            "minutes": sum(c.get("seconds", 0) for c in cells.values()) / 60,
            "machine": f"{m['cpu']}, {m['cpus']} CPUs, {', '.join(m['cpu_flags'])}",
            "command": " ".join(["python", "benchmarks/medmask_ablation.py", *(argv or sys.argv[1:])]),
            "fingerprint": fingerprint, "commit": commit,
            "demo": {str(g): demo_argv(spec, g) for g in data_seeds}, "date": m["date"],
            "answer": list(spec.get("answer") or []), "cells_by_cpu": _by_cpu(cells.values()),
            "teaching_default": choose_default(cells, spec.get("teaching_default")) if a.split == "calib" else None}
    import yaml

    (out / "config.resolved.yaml").write_text(yaml.safe_dump({"spec": spec, "seeds": seeds, "run_config": cfg_g},
                                                             sort_keys=False))
    (out / "results.json").write_text(json.dumps({"meta": meta, "table": table, "tables": tables,
                                                  "comparisons": comparisons, "hand_over": handed}, indent=1))
    text = "\n".join(report(table, meta, tables, comparisons, handed)) + "\n"
    (out / "results.md").write_text(text)
    plot(table, out / "froc.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
