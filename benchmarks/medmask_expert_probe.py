"""What do the demo experts' embeddings know? Ridge probes of each expert, one table.

    python benchmarks/medmask_expert_probe.py                       # every embeddings folder of the demo set
    python benchmarks/medmask_expert_probe.py --data-root demo_data/mammo --folders embeddings embeddings_lesion

For each embeddings folder of the demo set (``DATA_ROOT/demo/embeddings`` is the generator's own expert,
``embeddings_<expert>`` the ones `benchmarks/medmask_ablation.py` extracted for its expert rows), the
cross-validated ridge probes of `data_tools.demo_expert.probe_embeddings` on the train + test images:
breast density R^2, and ROC AUC for "holds a lesion" and "vendor B" from the mean token (what the
distillation sees: it mean-pools the expert's rows). Writes ``OUT/expert_probe.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def expert_name(demo: Path, folder: str) -> str:
    """A readable name for an embeddings folder: the generator's expert for ``embeddings``, else the suffix."""
    if folder == "embeddings":
        info = json.loads((demo / "_info.json").read_text())
        return f"{info['args'].get('expert', 'mae')} (the demo's default)"
    return folder.removeprefix("embeddings_")


def provenance(demo: Path, folder: str) -> str:
    """What the expert behind an embeddings folder was trained on, from its backbone's provenance record."""
    from data_tools.extract_embeddings import EXPERT_FILE
    from medssl.hub import backbone_config

    record = demo / folder / EXPERT_FILE
    source = json.loads(record.read_text()).get("source", "") if record.is_file() else ""
    config = backbone_config(source) if source else {}
    if not config:
        return f"`{source}`: no training record (a registry name is a seeded random init)" if source else "-"
    prov = config.get("provenance", {})
    text = f"{prov.get('data', '?')}"
    if "epochs" in prov:
        text += f", {prov['epochs']} epochs"
    if "val_dice" in prov:
        text += f", validation Dice {prov['val_dice']:.2f} (best epoch {prov.get('best_epoch')})"
    return text


def report(rows: list[dict]) -> list[str]:
    """Markdown table: one line per expert."""
    lines = ["Ridge probes of the demo experts' mean-pooled embeddings (5-fold cross-validated, train + test "
             f"images, n = {rows[0]['images']}): what the distillation could learn from them.", "",
             "| expert | breast density R^2 | lesion presence AUC | vendor B AUC | trained on |",
             "|---|---|---|---|---|"]
    return lines + [f"| {r['expert']} | {r['density_r2']:.2f} | {r['lesion_auc']:.2f} | {r['vendor_auc']:.2f} | "
                    f"{r.get('trained_on', '-')} |" for r in rows]


def main(argv: list[str] | None = None) -> int:
    from data_tools.demo_expert import probe_embeddings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=ROOT / "demo_data" / "mammo")
    p.add_argument("--folders", nargs="+", default=None, help="embeddings folders under DATA_ROOT/demo (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "medmask")
    a = p.parse_args(argv)
    demo = a.data_root / "demo"
    folders = a.folders or sorted(f.name for f in demo.glob("embeddings*") if (f / "manifest.jsonl").is_file())
    if not folders:
        raise SystemExit(f"no embeddings folder under {demo}: run `python -m data_tools.make_demo mammo` first")
    rows = [{"expert": expert_name(demo, f), "folder": f, "trained_on": provenance(demo, f),
             **probe_embeddings(demo, demo / f)} for f in folders]
    lines = report(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "expert_probe.json").write_text(json.dumps(rows, indent=1))
    (a.out / "expert_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
