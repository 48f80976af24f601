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

An MAE of a few minutes on a few hundred images is not a foundation model: its embeddings hardly know where
the lesions are (:func:`probe_embeddings`). The lesion expert (:func:`make_lesion_expert`, ``--expert lesion``)
stands in for what a model like BiomedParse brings from its supervised training on many annotated archives:
the MAE expert fine-tuned to segment lesions on an EXTERNAL labelled set, generated with another seed and
another vendor look (halfway between vendor A and vendor B, ``LESION_SHIFT``). It never sees a label, nor an
image, of the benchmark.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXPERT_CONFIG = ROOT / "recipes" / "configs" / "demo_expert.yaml"


def expert_backbone(demo_dir: str | Path) -> Path:
    """Where the demo's MAE expert backbone lives (``OUT/demo/expert/pretrain/backbone``)."""
    return Path(demo_dir) / "expert" / "pretrain" / "backbone"


LESION_SEED = 1000  # the external set's seed is the demo's seed + this: other images, other lesions
LESION_SHIFT = 0.5  # the external set's vendor look: halfway from vendor A to the demo's vendor B


def lesion_expert_backbone(demo_dir: str | Path) -> Path:
    """Where the demo's lesion expert backbone lives (``OUT/demo/expert_lesion/backbone``)."""
    return Path(demo_dir) / "expert_lesion" / "backbone"


def make_expert(demo_dir: str | Path, *, epochs: int | None = None, img_size: int | None = None, seed: int = 0,
                splits: tuple[str, ...] = ("train", "target"), precision: str | None = None) -> Path:
    """Build shards from ``splits`` of the demo set and pretrain the MAE expert on them; returns the backbone.

    Cached: an exported backbone is returned as it is; a pretraining run that was stopped resumes from its
    last checkpoint. ``epochs`` / ``img_size`` / ``precision`` (``train.precision``) override
    ``recipes/configs/demo_expert.yaml``.
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
    if precision is not None:
        overrides.append(f"train.precision={precision}")
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


class _SquareMasks:
    """An external demo split as ``(image [1, S, S] normalised, lesion box mask [S, S] long)`` pairs, the image
    read and resized exactly as `data_tools.extract_embeddings` does (stretched to the square)."""

    def __init__(self, root: Path, splits: tuple[str, ...], size: int, mean: float, std: float) -> None:
        import json

        import torch

        from data_tools.extract_embeddings import square_image

        xs, ys = [], []
        for split in splits:
            coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
            boxes: dict[int, list] = {}
            for a in coco.get("annotations", []):
                boxes.setdefault(a["image_id"], []).append(a["bbox"])
            folder = "target" if split == "target_truth" else split
            for im in coco["images"]:
                xs.append((square_image(root / "images" / folder / im["file_name"], size) - mean) / std)
                m = torch.zeros(size, size, dtype=torch.long)
                sy, sx = size / im["height"], size / im["width"]
                for x, y, w, h in boxes.get(im["id"], []):  # every pixel the box touches
                    m[int(y * sy):max(int(y * sy) + 1, math.ceil((y + h) * sy)),
                      int(x * sx):max(int(x * sx) + 1, math.ceil((x + w) * sx))] = 1
                ys.append(m)
        self.x, self.y = torch.stack(xs), torch.stack(ys)  # [N, 1, S, S], [N, S, S]


def make_lesion_expert(demo_dir: str | Path, generator: dict, *, init: str | Path, img_size: int = 64,
                       epochs: int = 40, seed: int = 0, shift: float = LESION_SHIFT) -> Path:
    """Fine-tune the backbone ``init`` (the demo's MAE expert) to segment lesions on an external labelled set;
    returns its exported backbone (cached: an exported one is returned as it is).

    The external set: the demo generator with seed ``seed + LESION_SEED`` and vendor shift ``shift``, the
    other arguments (``generator``: height, width, the four split sizes, abnormal_frac, lesion_contrast,
    lesion_size, distractors) as the demo's. Training on its ``train`` (vendor A), ``test`` and target
    (vendor look ``shift``, with their boxes), model selection on its ``val``; a ViT segmenter (Dice + CE)
    on the box masks, every layer trained, at ``img_size`` (the expert's input size).
    """
    import torch
    from torch.utils.data import TensorDataset

    from data_tools.mammo_synth import SPLITS, generate
    from medssl.heads.build import build_head, head_record, init_head
    from medssl.heads.classify import layer_decay_groups
    from medssl.heads.fit import FitConfig, dice_score, fit, random_hflip
    from medssl.heads.segment import dice_ce_loss
    from medssl.hub import save_backbone

    demo_dir = Path(demo_dir)
    backbone = lesion_expert_backbone(demo_dir)
    if (backbone / "config.json").is_file():
        return backbone
    ext = backbone.parent / "data"
    generate(ext, seed=int(generator["seed"]) + LESION_SEED, height=generator["height"], width=generator["width"],
             counts={s: int(generator.get(s, 0)) for s in SPLITS if s != "calib"},
             abnormal_frac=generator["abnormal_frac"], shift=shift,
             lesion_contrast=generator["lesion_contrast"], lesion_size=generator["lesion_size"],
             distractors=generator["distractors"])
    record = head_record("segment", "finetune", init, num_classes=2, img_size=img_size)
    norm = record["backbone"]["meta"]
    mean, std = float(np.mean(norm.get("mean", [0.5]))), float(np.mean(norm.get("std", [0.25])))  # as the expert
    train = _SquareMasks(ext, ("train", "test", "target_truth"), img_size, mean, std)
    val = _SquareMasks(ext, ("val",), img_size, mean, std)
    torch.manual_seed(seed)
    model = build_head(record)
    init_head(model, record)
    cfg = FitConfig(epochs=epochs, batch_size=32, lr=1e-3, weight_decay=0.05, warmup_epochs=3, seed=seed,
                    device="cpu")
    groups = layer_decay_groups(model, len(model.backbone.blocks), cfg.lr, cfg.weight_decay, 0.75)
    res = fit(model, TensorDataset(train.x, train.y), TensorDataset(val.x, val.y), dice_ce_loss, dice_score(2), cfg,
              param_groups=groups, augment=random_hflip)
    save_backbone(model.backbone, backbone, data=f"external demo set (seed {int(generator['seed']) + LESION_SEED}, "
                  f"shift {shift}): lesion segmentation", init=str(init), val_dice=round(res.best_score, 4),
                  best_epoch=res.best_epoch, mean=[mean], std=[std])
    shutil.rmtree(ext, ignore_errors=True)  # the external images are not needed once the expert is made
    return backbone


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
