"""Statistics that decide: seed-paired differences between table rows, t-intervals, sign tests, and the claim
sentences a README may make from them.

Two rows of a task are compared at one label budget on the seeds both ran: each seed draws the same label
subset for every row (`cells.label_subset`), so the difference of the main metric per seed is a paired
sample. Its mean gets a Student t-interval (n - 1 degrees of freedom; with the 5-10 seeds a CPU table affords,
a percentile bootstrap is too narrow and an exact sign test cannot reach p < 0.05 below 6 seeds) and an exact
two-sided sign test is reported beside it. A claim is made only where the interval excludes zero; everything
else reads "no difference shown", with the interval, so that a reader sees how large an effect the run could
have found. The intervals cover seed-to-seed variation (label subset, initialisation, order) on the task's
fixed test split, not the variation between test sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PRIMARY = {"classification": "auc", "segmentation": "dice", "detection": "r@0.3"}
LEVEL = 0.95


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Student t-interval of the mean of `diffs` (paired differences); (nan, nan) with fewer than 2."""
    from scipy.stats import t

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    half = float(t.ppf((1 + level) / 2, len(d) - 1)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return float(d.mean()) - half, float(d.mean()) + half


def sign_test(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test p-value of `diffs` (zeros dropped); 1.0 when no difference is non-zero."""
    d = np.asarray(diffs, dtype=float)
    up, down = int((d > 0).sum()), int((d < 0).sum())
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(up, down) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def cluster_bootstrap(statistic: Any, clusters: Sequence[Any], reps: int = 2000, level: float = LEVEL,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``statistic(index)`` over resamples of whole clusters with replacement.

    ``statistic`` takes an integer index array into the samples and returns a float; ``clusters`` gives each
    sample's cluster (e.g. the image a box is read from), so samples that share one are drawn together.
    Resamples where the statistic is undefined (nan, e.g. an AUC with one class) are dropped; (nan, nan) when more
    than 5% are. For a statistic with many independent clusters (dozens or more), not for the few seeds of a table
    (see `t_interval`)."""
    c = np.asarray(clusters)
    ids, inverse = np.unique(c, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(ids))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        pick = rng.integers(0, len(ids), len(ids))
        v = float(statistic(np.concatenate([members[k] for k in pick])))
        if not math.isnan(v):
            values.append(v)
    if len(values) < 0.95 * reps:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def paired(cells: list[dict[str, Any]], a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    """Row `a` minus row `b` (each {"row", "protocol"}) on the seeds both have, in one task and budget."""
    def by_seed(sel: dict[str, Any]) -> dict[int, float]:
        return {c["seed"]: float(c["metrics"].get(metric, math.nan)) for c in cells
                if c["row"] == sel["row"] and c["protocol"] == sel["protocol"]}

    va, vb = by_seed(a), by_seed(b)
    seeds = sorted(s for s in set(va) & set(vb) if not (math.isnan(va[s]) or math.isnan(vb[s])))
    d = [va[s] - vb[s] for s in seeds]
    lo, hi = t_interval(d)
    return {"seeds": seeds, "diffs": d, "mean": float(np.mean(d)) if d else math.nan, "ci": [lo, hi],
            "p_sign": sign_test(d), "up": sum(x > 0 for x in d), "down": sum(x < 0 for x in d),
            "decided": lo > 0 or hi < 0}


def comparisons(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pretrained row against its architecture at random init (same protocol) and the from-scratch CNN,
    per task and label budget, on the task's main metric; plus the random-init ViT against the CNN."""
    out = []
    for task in dict.fromkeys(c["task"] for c in cells):
        at_task = [c for c in cells if c["task"] == task]
        metric = PRIMARY[at_task[0]["kind"]]
        for frac in sorted({c["fraction"] for c in at_task}, key=lambda f: (f == 1, f)):
            at = [c for c in at_task if c["fraction"] == frac]
            rows = {(c["row"], c["protocol"]): c for c in at}
            cnn = [k for k, c in rows.items() if c["role"] == "cnn"]
            for (row, protocol), c in rows.items():
                if c["role"] == "cnn":
                    continue
                against = [k for k, r in rows.items() if r["role"] == "random" and r["backbone"] == c["backbone"]
                           and r["protocol"] == protocol] if c["role"] == "pretrained" else []
                for other in against + cnn:
                    res = paired(at, {"row": row, "protocol": protocol}, {"row": other[0], "protocol": other[1]},
                                 metric)
                    out.append({"task": task, **({"family": c["family"]} if "family" in c else {}),
                                "fraction": frac, "n_train": c["n_train"], "metric": metric,
                                "a": {"row": row, "protocol": protocol, "role": c["role"],
                                      **({"primary": c["primary"]} if "primary" in c else {}),
                                      "name": c["pretraining"] if c["role"] == "pretrained" else
                                      f"{c['backbone']} random init"},
                                "b": {"row": other[0], "protocol": other[1], "role": rows[other]["role"],
                                      "name": rows[other]["pretraining"] if rows[other]["role"] == "pretrained"
                                      else f"{rows[other]['backbone']} " + (
                                          "from scratch" if rows[other]["role"] == "cnn" else "random init")},
                                **res})
    return out


def _budget(frac: float, n_train: int) -> str:
    return f"all {n_train} labels" if frac == 1 else f"{n_train} labels"


def _bound(x: float) -> str:
    """An interval bound with 3 decimals, more where 3 would print a non-zero bound as +/-0.000 (a "better" whose
    interval seems to touch zero)."""
    for digits in (3, 4, 5, 6):
        text = f"{x:+.{digits}f}"
        if x == 0 or math.isnan(x) or float(text) != 0:
            return text
    return text


def claim(c: dict[str, Any]) -> str:
    """One sentence for one comparison: a claim where its interval excludes zero, else 'no difference shown'."""
    lo, hi = c["ci"]
    what = (f"{c['task']}, {_budget(c['fraction'], c['n_train'])}: {c['a']['name']} ({c['a']['protocol']}) vs "
            f"{c['b']['name']} ({c['b']['protocol']})")
    stats = (f"{c['metric']} {c['mean']:+.3f}, 95% CI [{_bound(lo)}, {_bound(hi)}] over {len(c['seeds'])} seeds "
             f"({c['up']} up / {c['down']} down, sign test p = {c['p_sign']:.2g})")
    if not c["decided"]:
        return f"{what}: no difference shown ({stats})."
    return f"{what}: **{'better' if lo > 0 else 'worse'}** ({stats})."


def beats_both(comps: list[dict[str, Any]]) -> bool:
    """Whether these comparisons of one pretrained row include both baselines, each with an interval above 0."""
    return {c["b"]["role"] for c in comps} >= {"cnn", "random"} and all(c["decided"] and c["ci"][0] > 0
                                                                          for c in comps)


def verdict(comps: list[dict[str, Any]], protocol: str = "finetune") -> dict[str, Any]:
    """Does pretraining pay off? Per task: at every low label budget (all labels excluded; a task run with all its
    labels only, such as the 3-D tasks whose whole training set is one or two CTs, is judged there; decided per
    fold, for the primary row), the primary pretrained
    row with the primary `protocol` beats BOTH baselines, the random-init ViT with the same protocol and the CNN,
    with 95% intervals above zero (an intersection-union test: requiring every comparison adds no false-positive
    chance; one named protocol and one named row keep "any protocol / any of several pretrained rows wins" from
    doing so). The folds of one task (cells naming a `family`) vote once: the task passes when every fold does.
    Overall: yes where that holds in most tasks. No row marked primary anywhere (a table of pretrained CNNs only,
    say): no task is judged and there is no answer.

    Raises:
        ValueError: a task has several pretrained rows and the cells name none primary (that would be best-of-n).
    """
    def pretrained(c: dict[str, Any]) -> bool:
        return c["a"]["role"] == "pretrained" and c["a"]["protocol"] == protocol

    tasks: dict[str, bool] = {}
    if not any(c["a"].get("primary", True) for c in comps if c["a"]["role"] == "pretrained"):
        return {"tasks": tasks, "protocol": protocol, "pays_off": False, "tasks_yes": 0, "tasks_total": 0}
    for fam in dict.fromkeys(c.get("family", c["task"]) for c in comps if c["a"]["role"] == "pretrained"):
        low = [c for c in comps if c.get("family", c["task"]) == fam and pretrained(c)]
        if not any("primary" in c["a"] for c in low) and len({c["a"]["row"] for c in low}) > 1:
            raise ValueError(f"task {fam}: {len({c['a']['row'] for c in low})} pretrained rows and none marked "
                             "primary; the answer must read one row (run_all marks the config's first)")
        low = [c for c in low if c["a"].get("primary", True)]
        by_fold: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for fold in dict.fromkeys(c["task"] for c in low):
            cs = [c for c in low if c["task"] == fold]
            if any(c["fraction"] != 1 for c in cs):  # its low budgets; all labels only where the fold has no other
                cs = [c for c in cs if c["fraction"] != 1]
            for c in cs:
                by_fold.setdefault((fold, c["fraction"]), []).append(c)
        tasks[fam] = bool(by_fold) and all(beats_both(cs) for cs in by_fold.values())
    n_yes = sum(tasks.values())
    return {"tasks": tasks, "protocol": protocol, "pays_off": n_yes > len(tasks) / 2, "tasks_yes": n_yes,
            "tasks_total": len(tasks)}


def verdict_sentence(v: dict[str, Any]) -> str:
    """The README's one-line answer, from `verdict` ("" when no task has a pretrained row to judge)."""
    if not v["tasks_total"]:
        return ""
    yes = [t for t, ok in v["tasks"].items() if ok]
    how = (f"a pretrained ViT ({v['protocol']}) better than both a random-init ViT ({v['protocol']}) and a "
           "from-scratch CNN, with 95% intervals above zero, at every low label budget (all labels where a task "
           "has no other)")
    if v["pays_off"]:
        return f"MAE pretraining pays off in {v['tasks_yes']} of {v['tasks_total']} tasks ({', '.join(yes)}): {how}."
    return (f"MAE pretraining does **not** pay off in this run: {v['tasks_yes']} of {v['tasks_total']} tasks"
            + (f" ({', '.join(yes)})" if yes else "") + f" show {how}.")
