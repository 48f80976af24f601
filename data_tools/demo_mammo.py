"""Synthetic screening mammograms with COCO lesion boxes: the `--dataset demo` of the MedMask recipe.

    python -m data_tools.make_demo mammo --out demo_data/mammo [--lesion-contrast 3 --lesion-size 2 --distractors 2]

Writes, deterministically for a given ``--seed`` (and options), the seed layout under ``OUT/demo``::

    annotations/instances_{train,val,test,target}.json   (target: images only, no annotations)
    annotations/instances_target_truth.json              (the target images WITH their boxes, see mammo_synth)
    annotations/instances_calib.json                     (with --calib N: the calibration split, see mammo_synth)
    images/{train,val,test,target,calib}/*.png           (16-bit greyscale)
    embeddings/<stem>_embedding.npy                      (expert embeddings, see extract_embeddings)
    expert/                                              (the MAE expert: shards, pretraining run, backbone)
    _info.json                                           (the arguments; written last = complete)

What the images show (anatomy, lesions, distractors, the vendor shift, the target split's ground truth):
:mod:`data_tools.mammo_synth`, which draws them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from data_tools.mammo_synth import DEFAULT_CONTRAST, DEFAULT_DISTRACTORS, DEFAULT_SIZE, MAX_SHIFT, SPLITS, generate

VERSION = 4  # of the generator, in _info.json: ensure_demo remakes sets of another version


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the generator's options to ``parser`` and set ``func=run``."""
    parser.add_argument("--out", default="demo_data/mammo", help="DATA_ROOT; the set goes to OUT/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=320, help="image height in pixels")
    parser.add_argument("--width", type=int, default=256, help="image width in pixels")
    parser.add_argument("--train", type=int, default=200, help="labelled source-domain images")
    parser.add_argument("--val", type=int, default=60, help="labelled target-domain validation images")
    parser.add_argument("--test", type=int, default=60, help="labelled target-domain test images")
    parser.add_argument("--target", type=int, default=120, help="unlabelled target-domain images")
    parser.add_argument("--calib", type=int, default=0,
                        help="labelled target-domain calibration images: generator knobs are tuned on them, never "
                             "on test (0: no calibration split)")
    parser.add_argument("--abnormal-frac", type=float, default=0.4, help="fraction of images with lesions")
    parser.add_argument("--shift", type=float, default=1.0,
                        help=f"domain gap of vendor B: 0 = none, 1 = the designed vendor B, up to {MAX_SHIFT}")
    parser.add_argument("--lesion-contrast", type=float, default=DEFAULT_CONTRAST,
                        help="multiplier on every lesion amplitude (1 = screening-like, hard)")
    parser.add_argument("--lesion-size", type=float, default=DEFAULT_SIZE,
                        help="multiplier on lesion sizes (masses' radii, calcification clusters' spread and specks)")
    parser.add_argument("--distractors", type=float, default=DEFAULT_DISTRACTORS,
                        help="mean number of unannotated lesion-like distractors per image (Poisson)")
    parser.add_argument("--expert", default="mae",
                        help="expert for the embeddings: 'mae' (default) pretrains a small medssl MAE on the "
                             "set's unlabelled train + target images (data_tools/demo_expert.py, cached under "
                             "OUT/demo/expert); 'lesion' fine-tunes that MAE to segment lesions on an external "
                             "generated set (another seed and vendor look; OUT/demo/expert_lesion); else anything "
                             "medssl.load_backbone accepts (a registry name is a seeded random init: the "
                             "uninformative ablation); 'none' skips them")
    parser.add_argument("--expert-epochs", type=int, default=None,
                        help="pretraining epochs of the 'mae' expert (default: recipes/configs/demo_expert.yaml)")
    parser.add_argument("--expert-precision", default=None, choices=("auto", "fp32", "bf16"),
                        help="train.precision of the 'mae' expert's pretraining (default: demo_expert.yaml's, auto; "
                             "fp32 gives the same expert on every CPU kind)")
    parser.add_argument("--lesion-epochs", type=int, default=40,
                        help="fine-tuning epochs of the 'lesion' expert on its external labelled set")
    parser.add_argument("--embed-size", type=int, default=64, help="expert input size (square)")
    parser.add_argument("--embed-grid", type=int, default=4,
                        help="expert tokens pooled to GRID x GRID (+ cls)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the demo set (see the module docstring); returns 0."""
    t0 = time.time()
    out = Path(args.out) / "demo"
    info = out / "_info.json"
    info.unlink(missing_ok=True)  # incomplete until rewritten at the end
    counts = {s: int(getattr(args, s)) for s in SPLITS}
    if min(v for k, v in counts.items() if k != "calib") < 1 or counts["calib"] < 0:
        raise ValueError(f"every split needs at least one image (calib: 0 or more), got {counts}")
    n_lesions = generate(out, seed=args.seed, height=args.height, width=args.width, counts=counts,
                         abnormal_frac=args.abnormal_frac, shift=args.shift, lesion_contrast=args.lesion_contrast,
                         lesion_size=args.lesion_size,
                         distractors=args.distractors)
    t_images = time.time() - t0
    for stale in (out / "expert", out / "expert_lesion", *out.glob("embeddings*")):  # made from the old images
        shutil.rmtree(stale, ignore_errors=True)
    if str(args.expert).lower() != "none":
        write_embeddings(out, str(args.expert), vars(args), out / "embeddings")
    record = {"version": VERSION, "args": {k: v for k, v in vars(args).items() if k != "func"}, "images": counts,
              "lesions": n_lesions, "seconds_images": round(t_images, 1), "seconds": round(time.time() - t0, 1)}
    info.write_text(json.dumps(record, indent=1))
    print(f"demo mammography set written to {out}: images {counts}, lesions {n_lesions}, "
          f"{record['seconds']} s ({record['seconds_images']} s images)")
    return 0


def write_embeddings(out: Path, expert: str, args: dict[str, Any], folder: Path) -> Path:
    """Embed every image of the set under ``out`` (= DATA_ROOT/demo) with ``expert`` into ``folder``.

    ``expert``: ``mae`` (the MAE pretrained on the set's unlabelled images), ``lesion`` (that MAE fine-tuned
    to segment lesions on an external generated set, data_tools/demo_expert.py), both made once and cached
    under ``out``, or any ``extract_embeddings --model`` source. ``args``: the generator's arguments.
    """
    from data_tools.demo_expert import make_expert, make_lesion_expert
    from data_tools.extract_embeddings import extract_embeddings

    source = expert
    if expert.lower() in ("mae", "lesion"):
        mae = make_expert(out, epochs=args["expert_epochs"], img_size=args["embed_size"], seed=args["seed"],
                          precision=args.get("expert_precision"))
        source = str(mae) if expert.lower() == "mae" else str(
            make_lesion_expert(out, args, init=mae, img_size=args["embed_size"], epochs=args.get("lesion_epochs", 40),
                               seed=args["seed"]))
    extract_embeddings(source, sorted((out / "images").rglob("*.png")), folder, grid=args["embed_grid"],
                       img_size=args["embed_size"], seed=args["seed"])
    return folder


def ensure_demo(root: str | Path, argv: list[str] | None = None) -> Path:
    """Generate the demo set under ``root`` (= DATA_ROOT) unless it is complete.

    Returns ``root/demo``. A set is complete once its ``_info.json`` is written (the last step); a set
    written by another :data:`VERSION` of this generator is made again, and so is one made with other
    generator arguments than ``argv`` (command-line form, e.g. ``["--seed", "1", "--test", "180"]``; None: the
    defaults for a new set, any arguments for an existing one).
    """
    out = Path(root) / "demo"
    info = out / "_info.json"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(root), *(argv or [])])
    old = json.loads(info.read_text()) if info.is_file() else {}
    want = {k: v for k, v in vars(args).items() if k not in ("func", "out")}
    have = {k: v for k, v in old.get("args", {}).items() if k != "out"}
    if old.get("version") != VERSION or (argv is not None and have != want):
        print(f"generating the synthetic mammography demo set under {root} (once)")
        run(args)
    return out
