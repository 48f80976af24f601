"""How good would a teacher's pseudo-labels be at each score threshold? A diagnostic for MedMask's teaching.

    python benchmarks/medmask_teacher_sweep.py --config benchmarks/configs/medmask.yaml
    python benchmarks/medmask_teacher_sweep.py --row "stage 2 (MAE + distillation)" --thresholds 0.2 0.3 0.5

Reads the ablation's cached cells (`benchmarks/medmask_ablation.py`, same config, current code only) of
one row (default: the full stage 2, the teacher that stage 3 starts from), loads each seed's best
checkpoint and scores the pseudo-labels it would give on the unlabelled target pool, at every threshold,
against the pool's true boxes (`medssl.detection.evaluation.pseudo_label_quality`: one-to-one matching at
IoU >= 0.5, class-agnostic NMS as in teaching). The true boxes exist only because the demo is generated;
nothing here trains anything. Writes ``OUT/teacher_sweep.json`` and ``OUT/teacher_sweep.md`` (mean +- std
over seeds per threshold).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.medmask_cells import CODE_ENTRIES, run_config
from benchmarks.provenance import code_files, code_fingerprint
from medssl.config import read_yaml

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("medssl")
KEYS = ("pseudo_precision", "pseudo_recall", "pseudo_per_image")


def run_cells(cells_dir: Path, fingerprint: str) -> list[dict[str, Any]]:
    """The ablation's cached cells computed by the code of ``fingerprint`` (cells of older code are left out)."""
    found = (json.loads(f.read_text()) for f in sorted(cells_dir.glob("*.json"))) if cells_dir.is_dir() else ()
    return [c for c in found if c.get("fingerprint") == fingerprint]


def sweep_cell(spec: dict[str, Any], row: dict[str, Any], cell: dict[str, Any], thresholds: list[float]
               ) -> list[dict[str, float]]:
    """Pseudo-label precision / recall / count per image of one cell's best checkpoint at each threshold."""
    import torch

    from medssl.data.coco import build_dataset
    from medssl.detection.data import transforms
    from medssl.detection.evaluation import pseudo_label_quality
    from medssl.detection.predict import load_detector

    cfg = run_config(spec, row, int(cell["seed"]), cell.get("data_seed"), cell.get("rule", "best"))
    d = cfg["data"]
    truth = build_dataset(d["target_dataset"] or d["dataset"], cfg["eval"]["pseudo_truth"] or "target_truth",
                          d["data_root"], transforms(cfg, "none"))
    model, _ = load_detector(Path(cell["stage_dir"]) / f"{cfg['eval']['checkpoint']}.pt")
    nms = cfg["teaching"]["nms_iou"]
    with torch.no_grad():
        return [{"threshold": t, **pseudo_label_quality(model, truth, cfg, t, nms, torch.device("cpu"))}
                for t in thresholds]


def summarise(per_seed: list[list[dict[str, float]]], thresholds: list[float]) -> list[dict[str, Any]]:
    """Mean and std over seeds per threshold (NaN precision, i.e. no pseudo-label, left out of the mean)."""
    out = []
    for i, t in enumerate(thresholds):
        entry: dict[str, Any] = {"threshold": t}
        for k in KEYS:
            v = np.asarray([s[i][k] for s in per_seed], float)
            v = v[np.isfinite(v)]
            entry[k] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))] if len(v) else None
        out.append(entry)
    return out


def report(row: str, seeds: list[int], table: list[dict[str, Any]]) -> list[str]:
    """Markdown table: one line per threshold."""
    lines = [f"Pseudo-labels the `{row}` checkpoint would give on the unlabelled target pool, against its true "
             f"boxes (IoU >= 0.5, one-to-one), mean +- std over seeds {seeds}:", "",
             "| score threshold | precision | recall | pseudo-labels per image |", "|---|---|---|---|"]
    for e in table:
        cells = []
        for k in KEYS:
            v = e[k]
            cells.append("- (none)" if v is None else f"{v[0]:.2f} +- {v[1]:.2f}" + (
                f" ({v[2]} seeds)" if v[2] != len(seeds) else ""))
        lines.append(f"| {e['threshold']:.2f} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "benchmarks" / "configs" / "medmask.yaml")
    p.add_argument("--row", default="stage 2 (MAE + distillation)", help="ablation row whose checkpoints to sweep")
    p.add_argument("--thresholds", type=float, nargs="+",
                   default=[0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = read_yaml(a.config.read_text())
    out = ROOT / spec.get("out", "benchmarks/results/medmask")
    row = next((r for r in spec["rows"] if r["name"] == a.row), None)
    if row is None:
        raise SystemExit(f"{a.config}: no row named {a.row!r}")
    fingerprint = code_fingerprint(code_files(list(CODE_ENTRIES)))
    cells = sorted((c for c in run_cells(out / "cells", fingerprint) if c.get("row") == a.row and c.get("stage_dir")
                    and c.get("rule", "best") == "best"), key=lambda c: (c.get("data_seed") or 0, c["seed"]))
    if not cells:
        raise SystemExit(f"no cell of row {a.row!r} for the current code under {out / 'cells'}: run "
                         f"`python benchmarks/medmask_ablation.py --config {a.config}` first")
    per_seed = []
    for c in cells:
        log.info("row %r seed %d: %s", a.row, c["seed"], c["stage_dir"])
        per_seed.append(sweep_cell(spec, row, c, a.thresholds))
    seeds = [int(c["seed"]) for c in cells]
    table = summarise(per_seed, a.thresholds)
    (out / "teacher_sweep.json").write_text(json.dumps(
        {"row": a.row, "seeds": seeds, "fingerprint": fingerprint, "per_seed": per_seed, "table": table}, indent=1))
    text = "\n".join(report(a.row, seeds, table)) + "\n"
    (out / "teacher_sweep.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
