"""What do the demo experts' embeddings know? Ridge probes of each expert, one table.

    python benchmarks/medmask_expert_probe.py                       # every embeddings folder of the demo set
    python benchmarks/medmask_expert_probe.py --data-root demo_data/mammo --folders embeddings embeddings_lesion
    python benchmarks/medmask_expert_probe.py --data-root demo_data/mammo/seed3 --merge   # add a set to the table

For each embeddings folder of the demo set (``DATA_ROOT/demo/embeddings`` is the generator's own expert,
``embeddings_<expert>`` the ones `benchmarks/medmask_ablation.py` extracted for its expert rows), the
cross-validated ridge probes of `data_tools.demo_expert.probe_embeddings` on the train + test images:
breast density R^2, and ROC AUC for "holds a lesion" and "vendor B" from the mean token (what the
distillation sees: it mean-pools the expert's rows). Writes ``OUT/expert_probe.json`` and ``.md``.

Region level (what the ``object`` distillation sees, `region_probe`): each lesion's box averaged over the expert's
token grid as the distillation does (`medssl.detection.medmask.region_embeddings`), against the same box on other
images of the same view (position tells nothing); the ROC AUC of a ridge score cross-validated by image, beside
the same probe on the box's pixel statistics (mean, std, min, max: what brightness alone tells).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

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
    if not source:
        return "-"
    # a folder path is stored as given when the set was made (relative to where that ran): look above the set too
    found = next((p for p in (Path(source), *(d / source for d in demo.resolve().parents)) if p.exists()), None)
    if found is None and "/" in source:
        return f"`{source}`: not found from here, no training record read"
    config = backbone_config(str(found or source))
    if not config:
        return f"`{source}`: no training record (a registry name is a seeded random init)"
    prov = config.get("provenance", {})
    data = str(prov.get("data", "?"))
    text = data[data.index("demo_data/"):] if "demo_data/" in data else data  # the part of a path that travels
    if "epochs" in prov:
        text += f", {prov['epochs']} epochs"
    if "val_dice" in prov:
        text += f", validation Dice {prov['val_dice']:.2f} (best epoch {prov.get('best_epoch')})"
    return text


def _cv_scores(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5, alpha: float = 1.0) -> np.ndarray:
    """Out-of-fold ridge scores, ``folds``-fold cross-validated with every group (image) in one fold."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    ids = np.unique(groups)
    fold_of = dict(zip(ids, np.random.default_rng(0).permutation(len(ids)) % folds))
    fold = np.asarray([fold_of[g] for g in groups])
    pred = np.zeros(len(y))
    for f in range(folds):
        test, train = fold == f, fold != f
        a = x[train].T @ x[train] + alpha * train.sum() * np.eye(x.shape[1])
        wts = np.linalg.solve(a, x[train].T @ (y[train] - y[train].mean()))
        pred[test] = x[test] @ wts
    return pred


def _auc_with_interval(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, list[float]]:
    """Cross-validated ridge AUC and its 95% interval: the out-of-fold scores' AUC over resamples of the images
    (``groups``: an image's boxes drawn together). The probe is not refitted per resample (refitting on a resample,
    about 63% distinct images, biases the AUC down), so the interval covers which images were drawn, not the
    probe's fitting; a lesion's box and the boxes compared with it come from different images and may be drawn
    apart."""
    from benchmarks.stats import cluster_bootstrap
    from medssl.metrics.classification import binary_auc

    pred = _cv_scores(x, y, groups)
    lo, hi = cluster_bootstrap(lambda i: binary_auc(y[i].astype(int), pred[i]), groups)
    return float(binary_auc(y.astype(int), pred)), [lo, hi]


def region_probe(demo_dir: str | Path, embeddings: str | Path, splits: tuple[str, ...] = ("train", "test"),
                 negatives: int = 3, tissue: float = 0.95) -> dict[str, float | int]:
    """Does an expert's token grid tell a lesion's region from tissue at the same place in another breast?

    Each lesion box (a positive) and the same box on up to ``negatives`` other images of the same view (seeded
    draw; taken where no lesion of that image overlaps the box and at least ``tissue`` of its pixels are breast,
    as every lesion's are), so that position tells nothing. Features: the expert's grid rows averaged inside the
    box as the ``object`` distillation does (`medssl.detection.medmask.region_embeddings`; boxes normalised to the
    image, which the expert sees stretched to its square input), and the box's pixel statistics (mean, std, min,
    max). Returns ``{"region_auc", "pixel_auc", "regions", "lesions"}`` (ridge AUCs cross-validated with each
    image's boxes in one fold) with ``region_ci`` / ``pixel_ci``, their 95% intervals (`_auc_with_interval`), or
    ``{}`` for an expert without a token grid (one row, or no
    ``grid`` record)."""
    import torch

    from data_tools.extract_embeddings import EXPERT_FILE
    from medssl.data.coco import read_image
    from medssl.detection.medmask import region_embeddings

    demo_dir, emb_dir = Path(demo_dir), Path(embeddings)
    record = emb_dir / EXPERT_FILE
    grid = int(json.loads(record.read_text()).get("grid") or 0) if record.is_file() else 0
    if grid < 1:
        return {}
    images = []  # (image [H, W], tokens [g*g, D], view, lesion boxes xyxy in pixels); its index is its CV group
    for split in splits:
        coco = json.loads((demo_dir / "annotations" / f"instances_{split}.json").read_text())
        boxes: dict[int, list[list[float]]] = {}
        for a in coco.get("annotations", []):
            x, y, bw, bh = a["bbox"]
            boxes.setdefault(a["image_id"], []).append([x, y, x + bw, y + bh])
        for im in coco["images"]:
            tokens = np.load(emb_dir / f"{Path(im['file_name']).stem}_embedding.npy")
            if len(tokens) < grid * grid:
                return {}
            images.append((read_image(demo_dir / "images" / split / im["file_name"]),
                           torch.from_numpy(tokens[len(tokens) - grid * grid:]).float(), im.get("view"),
                           np.asarray(boxes.get(im["id"], []), np.float64).reshape(-1, 4)))
    rng = np.random.default_rng(0)
    feats, pix, ys, groups = [], [], [], []

    def add(k: int, box: np.ndarray, label: float) -> None:
        image, tokens, _, _ = images[k]
        h, w = image.shape
        norm = torch.from_numpy(box / [w, h, w, h]).float()[None]
        feats.append(region_embeddings(tokens, norm)[0].numpy())
        x0, y0, x1, y1 = box.astype(int)
        crop = image[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
        pix.append([crop.mean(), crop.std(), crop.min(), crop.max()])
        ys.append(label)
        groups.append(k)  # the image the box is read from (its fold and its bootstrap cluster)

    lesions = 0
    for i, (_, _, view, lesion_boxes) in enumerate(images):
        for box in lesion_boxes:
            add(i, box, 1.0)
            found = 0
            x0, y0, x1, y1 = box.astype(int)
            for k in rng.permutation(len(images)):
                if found == negatives:
                    break
                image, _, other_view, other = images[k]
                if k == i or other_view != view or (image[y0:y1, x0:x1] > 0.05).mean() < tissue:
                    continue
                if any(ox0 < box[2] and box[0] < ox1 and oy0 < box[3] and box[1] < oy1 for ox0, oy0, ox1, oy1 in other):
                    continue
                add(int(k), box, 0.0)
                found += 1
            lesions += 1
    if not lesions:
        return {}
    y, g = np.asarray(ys), np.asarray(groups)
    region_auc, region_ci = _auc_with_interval(np.asarray(feats, np.float64), y, g)
    pixel_auc, pixel_ci = _auc_with_interval(np.asarray(pix, np.float64), y, g)
    return {"region_auc": region_auc, "region_ci": region_ci, "pixel_auc": pixel_auc, "pixel_ci": pixel_ci,
            "regions": len(y), "lesions": lesions}


def report(rows: list[dict]) -> list[str]:
    """Markdown table: one line per expert and generated set (the region columns where they were probed)."""
    regions = any("region_auc" in r for r in rows)
    head = ["expert", "set", "breast density R^2", "lesion presence AUC", "vendor B AUC",
            *(["lesion region AUC", "pixel statistics AUC", "lesions (boxes)"] if regions else []), "trained on"]
    counts = sorted({r["images"] for r in rows})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    text = (f"Ridge probes of the demo experts' embeddings (5-fold cross-validated by image; 0.5 = chance). Image "
            f"level, over the train + test images (n = {n} per set), from the mean-pooled rows: what the "
            "image-level distillation sees.")
    if regions:
        text += (" Region level, from each lesion's box and the same box on up to 3 other images of the same view "
                 "(breast tissue, no lesion there: position tells nothing), the expert's token grid averaged inside "
                 "the box: what the object-level distillation sees; beside it the same probe on the boxes' pixel "
                 "statistics (brightness alone); 95% intervals from resampling the images (each with its boxes) with "
                 "the out-of-fold scores held fixed: they cover which images were drawn, not the probe's fitting.")
    lines = [text, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["expert"], r.get("set", "-"), f"{r['density_r2']:.2f}", f"{r['lesion_auc']:.2f}",
                 f"{r['vendor_auc']:.2f}"]
        if regions:
            cells += [_f(r.get("region_auc"), r.get("region_ci")), _f(r.get("pixel_auc"), r.get("pixel_ci")),
                      f"{r['lesions']} ({r['regions']})" if "regions" in r else "-"]
        lines.append("| " + " | ".join([*cells, r.get("trained_on", "-")]) + " |")
    return lines


def _f(x: float | None, ci: list[float] | None = None) -> str:
    """"0.51 [0.44, 0.58]" (the interval where there is one), "-" for none."""
    if x is None:
        return "-"
    return f"{x:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows of the sets not in ``new`` (rows without a set, from before sets were recorded, are dropped),
    then ``new``; ordered by set, then embeddings folder."""
    probed = {r.get("set") for r in new}
    kept = [r for r in old if r.get("set") is not None and r.get("set") not in probed]
    return sorted(kept + new, key=lambda r: (str(r.get("set")), r["folder"]))


def main(argv: list[str] | None = None) -> int:
    from data_tools.demo_expert import probe_embeddings
    from data_tools.demo_mammo import write_embeddings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, nargs="+", default=[ROOT / "demo_data" / "mammo"],
                   help="DATA_ROOT of each generated set to probe (e.g. demo_data/mammo/seed1 seed2 seed3)")
    p.add_argument("--folders", nargs="+", default=None, help="embeddings folders under DATA_ROOT/demo (default: all)")
    p.add_argument("--extract", nargs="+", default=[],
                   help="experts to embed each set with first where missing, into embeddings_<name> (e.g. "
                        "vit_tiny_patch8: a seeded random init, the control)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "medmask")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of OUT/expert_probe.json for sets not probed now (a set's rows are replaced)")
    a = p.parse_args(argv)
    rows = []
    for root in a.data_root:
        demo = root / "demo"
        for name in a.extract:
            folder = demo / f"embeddings_{name}"
            if not (folder / "manifest.jsonl").is_file():
                write_embeddings(demo, name, json.loads((demo / "_info.json").read_text())["args"], folder)
        folders = a.folders or sorted(f.name for f in demo.glob("embeddings*") if (f / "manifest.jsonl").is_file())
        if not folders:
            raise SystemExit(f"no embeddings folder under {demo}: run `python -m data_tools.make_demo mammo` first")
        rows += [{"expert": expert_name(demo, f), "set": root.name, "folder": f, "trained_on": provenance(demo, f),
                  **probe_embeddings(demo, demo / f), **region_probe(demo, demo / f)} for f in folders]
    old = a.out / "expert_probe.json"
    if a.merge and old.is_file():
        rows = merge_rows(json.loads(old.read_text()), rows)
    lines = report(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "expert_probe.json").write_text(json.dumps(rows, indent=1))
    (a.out / "expert_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
