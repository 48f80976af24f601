"""The mammography demo's expert: a medssl MAE backbone pretrained on the demo's unlabelled images.

MedMask distils from a foundation model's embeddings of each image. The demo cannot ship one, and random
features carry nothing to distil, so the demo's default expert is made from the demo itself, with the same
commands a user runs on an archive of their own (cached under ``OUT/demo/expert``; built once):

    python -m data_tools.build_shards OUT/demo/images/train OUT/demo/images/target \\
        --out OUT/demo/expert/shards --size 64 --fit pad --modality MG --workers 0
    python recipes/pretrain_lumid.py --config recipes/configs/demo_expert.yaml \\
        data.shards=OUT/demo/expert/shards output.dir=OUT/demo/expert/pretrain
    python -m data_tools.extract_embeddings --model OUT/demo/expert/pretrain/backbone ...   # by make_demo

Only the source-domain training images and the unlabelled target-domain pool are used (both vendors, no
labels); the validation and test images never are.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERT_CONFIG = ROOT / "recipes" / "configs" / "demo_expert.yaml"


def expert_backbone(demo_dir: str | Path) -> Path:
    """Where the demo's MAE expert backbone lives (``OUT/demo/expert/pretrain/backbone``)."""
    return Path(demo_dir) / "expert" / "pretrain" / "backbone"


def make_expert(demo_dir: str | Path, *, epochs: int | None = None, img_size: int | None = None, seed: int = 0,
                splits: tuple[str, ...] = ("train", "target")) -> Path:
    """Build shards from ``splits`` of the demo set and pretrain the MAE expert on them; returns the backbone.

    Cached: an exported backbone is returned as it is; a pretraining run that was stopped resumes from its
    last checkpoint. ``epochs`` / ``img_size`` override ``recipes/configs/demo_expert.yaml``.
    """
    from data_tools.build_shards import main as build_shards
    from medssl.config import load_config
    from medssl.pretrain import DEFAULTS, run
    from medssl.train.dist import DistInfo, resolve_device

    demo_dir = Path(demo_dir)
    backbone = expert_backbone(demo_dir)
    if (backbone / "config.json").is_file():
        return backbone
    overrides = [f"train.seed={seed}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if img_size is not None:
        overrides.append(f"data.img_size={img_size}")
    shards = demo_dir / "expert" / "shards"
    out = demo_dir / "expert" / "pretrain"
    overrides += [f"data.shards={shards}", f"output.dir={out}"]
    cfg = load_config(DEFAULTS, EXPERT_CONFIG, overrides)
    folders = [str(demo_dir / "images" / s) for s in splits]  # a finished build skips every input it holds
    code = build_shards([*folders, "--out", str(shards), "--size", str(cfg["data"]["img_size"]), "--fit", "pad",
                         "--modality", "MG", "--workers", "0", "--no-progress"])
    if code != 0:
        raise RuntimeError(f"building the expert's shards under {shards} failed (exit {code})")
    ckpts = out / "checkpoints"
    resume = ckpts.is_dir() and any(ckpts.iterdir())
    return run(cfg, DistInfo(device=resolve_device(cfg["train"]["device"])), resume=resume)


def probe_embeddings(demo_dir: str | Path, embeddings: str | Path, splits: tuple[str, ...] = ("train", "test"),
                     folds: int = 5, alpha: float = 1.0) -> dict[str, float]:
    """How much an expert's embeddings know about the demo images: cross-validated ridge regression from
    the mean token of each image's embedding to facts the generator knows (not used in training).

    Returns ``{"density_r2": ..., "lesion_auc": ..., "vendor_auc": ..., "images": n}``: R^2 of the breast
    density, and the ROC AUC of the ridge score for "holds a lesion" and for "vendor B" (0.5 = chance).
    """
    import json

    import numpy as np

    from medssl.metrics.classification import binary_auc

    demo_dir, emb_dir = Path(demo_dir), Path(embeddings)
    xs, density, lesion, vendor = [], [], [], []
    for split in splits:
        coco = json.loads((demo_dir / "annotations" / f"instances_{split}.json").read_text())
        with_lesion = {a["image_id"] for a in coco.get("annotations", [])}
        for im in coco["images"]:
            e = np.load(emb_dir / f"{Path(im['file_name']).stem}_embedding.npy")
            xs.append(e.reshape(-1, e.shape[-1]).mean(0))
            density.append(im["density"])
            lesion.append(float(im["id"] in with_lesion))
            vendor.append(float(im.get("vendor") == "B"))
    x = np.asarray(xs, np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    order = np.random.default_rng(0).permutation(len(x))
    preds = {k: np.zeros(len(x)) for k in ("density", "lesion", "vendor")}
    ys = {"density": np.asarray(density), "lesion": np.asarray(lesion), "vendor": np.asarray(vendor)}
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        a = x[train].T @ x[train] + alpha * len(train) * np.eye(x.shape[1])
        for k, y in ys.items():
            w = np.linalg.solve(a, x[train].T @ (y[train] - y[train].mean()))
            preds[k][test] = x[test] @ w + y[train].mean()
    y = ys["density"]
    r2 = 1 - ((preds["density"] - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    out = {"density_r2": float(r2), "images": len(x)}
    for k in ("lesion", "vendor"):
        out[f"{k}_auc"] = float(binary_auc(ys[k].astype(int), preds[k])) if 0 < ys[k].mean() < 1 else float("nan")
    return out
