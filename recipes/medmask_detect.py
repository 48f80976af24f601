"""MedMask lesion detection: Deformable DETR + feature MAE + expert distillation + teaching, in 3 stages.

    python recipes/medmask_detect.py --dataset demo                       # synthetic set, CPU, ~10 min
    python recipes/medmask_detect.py --dataset ddsm --data-root DATA --stage all
    python recipes/medmask_detect.py --dataset ddsm --data-root DATA --stage teaching   # from cross_domain_mae
    python recipes/medmask_detect.py --dataset ddsm --data-root DATA --resume   # continue a killed run
    torchrun --nproc_per_node 4 recipes/medmask_detect.py --dataset ddsm --data-root DATA
    deepspeed --num_accelerators 4 recipes/medmask_detect.py --deepspeed \
        --deepspeed_config recipes/configs/ds_zero2.json --dataset ddsm --data-root DATA
    python recipes/medmask_detect.py predict --checkpoint runs/medmask/teaching/best.pt IMAGES_OR_DIRS...
    python recipes/medmask_detect.py predict --onnx exported/model.onnx IMAGES_OR_DIRS...   # ONNX Runtime

Config: recipes/configs/medmask_<dataset>.yaml if present, else medmask_default.yaml; `--set a.b=value`
overrides any key (data.batch_size is per rank). All logic lives in medssl.detection.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medssl.config import dump_config, load_config
from medssl.data.coco import DatasetNotFoundError
from medssl.detection.config import DEFAULTS, STAGES
from medssl.detection.predict import OVERLAY_MAX_SIDE, predict_files
from medssl.detection.stages import run_stages
from medssl.train.dist import barrier
from medssl.train.launch import add_launcher_args, launched

CONFIGS = Path(__file__).parent / "configs"


def _train_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ddsm", help="registered dataset: ddsm, inbreast, rsna-bsd1k, demo, ...")
    p.add_argument("--data-root", default=None, help="DATA_ROOT holding <dataset>/annotations and images")
    p.add_argument("--stage", default="all", choices=[*STAGES, "all"])
    p.add_argument("--config", default=None, help="YAML config (default: by dataset)")
    p.add_argument("--init", default=None, help="checkpoint to start the (first) stage from")
    p.add_argument("--out", default=None, help="run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    add_launcher_args(p, "continue the run in --out: finished stages are kept, the interrupted one resumes")
    return p.parse_args(argv)


def _predict_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medmask_detect.py predict", description="Detect lesions in images.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a MedMask stage checkpoint (PyTorch)")
    src.add_argument("--onnx", help="a detector exported by `python -m medssl.export` (ONNX Runtime, CPU)")
    p.add_argument("--out", default="predictions")
    p.add_argument("--score-threshold", type=float, default=0.3, help="overlay only boxes scoring >= this")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overlay-max-side", type=int, default=OVERLAY_MAX_SIDE,
                   help="overlay PNGs: longer side in pixels, boxes scaled alike (0: the image's own size; "
                        "predictions.json always holds the file's own pixels)")
    p.add_argument("--no-overlays", action="store_true", help="write predictions.json only")
    p.add_argument("images", nargs="+", help="image files or folders (PNG/JPEG/TIFF/DICOM)")
    a = p.parse_args(argv)
    if a.overlay_max_side < 0:
        p.error(f"--overlay-max-side must be >= 0 (0: the image's own size), got {a.overlay_max_side}")
    return a


def main(argv: list[str] | None = None) -> int:
    """Entry point: train stages (default) or ``predict``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        a = _predict_args(argv[1:])
        if a.onnx:
            from medssl.export.runner import predict_onnx

            res = predict_onnx(a.onnx, a.images, a.out, a.score_threshold, DEFAULTS["eval"]["nms_iou"],
                               overlays=not a.no_overlays, overlay_max_side=a.overlay_max_side or None)
        else:
            res = predict_files(a.checkpoint, a.images, a.out, a.score_threshold, a.device,
                                overlays=not a.no_overlays, overlay_max_side=a.overlay_max_side or None)
        skipped = Path(a.out) / "skipped.json"
        n_skipped = len(json.loads(skipped.read_text())) if skipped.is_file() else 0
        print(f"{len(res)} images -> {Path(a.out) / 'predictions.json'}"
              + ("" if a.no_overlays else f" and overlays in {a.out}")
              + (f"; {n_skipped} skipped, reasons in {skipped}" if n_skipped else ""))
        return 0
    a = _train_args(argv)
    path = a.config or next((p for p in (CONFIGS / f"medmask_{a.dataset}.yaml",) if p.is_file()),
                            CONFIGS / "medmask_default.yaml")
    sets = [f"data.dataset={a.dataset}", *([f"data.data_root={a.data_root}"] if a.data_root else []),
            *([f"out={a.out}"] if a.out else []), *a.set]
    cfg = load_config(DEFAULTS, path, sets)
    if a.dataset == "demo" and cfg["data"]["embeddings"] is None:  # the demo's expert embeddings beside its images
        cfg["data"]["embeddings"] = str(Path(cfg["data"]["data_root"]) / "demo" / "embeddings")
    stages = list(STAGES) if a.stage == "all" else [a.stage]
    init = a.init
    if init is None and stages[0] != "source_only":
        prev = STAGES[STAGES.index(stages[0]) - 1]
        init = Path(cfg["out"]) / prev / "best.pt"
        if not init.is_file():
            print(f"stage {stages[0]} starts from the previous stage's best checkpoint, {init}, which does not "
                  f"exist: run --stage {prev} first or pass --init CKPT", file=sys.stderr)
            return 2
    with launched(a, cfg["device"]) as (dist, ds_config):
        if dist.is_main:
            if a.dataset == "demo":
                from data_tools.demo_mammo import ensure_demo

                ensure_demo(cfg["data"]["data_root"])  # made once, by rank 0
            dump_config(cfg, Path(cfg["out"]) / "config.yaml")
        barrier(dist)
        try:
            results = run_stages(cfg, stages, init=init, dist=dist, ds_config=ds_config, resume=a.resume)
        except DatasetNotFoundError as e:
            print(e, file=sys.stderr)
            return 2
        if dist.is_main:
            _print_tables(results, "CPU demo data" if a.dataset == "demo" else a.dataset, cfg)
    return 0


def _print_tables(results: dict, where: str, cfg: dict) -> None:
    test = results.pop("test", None)
    final = results.pop("final", None)
    for title, table in ((f"validation ({where}, best epoch)", results), (f"held-out test ({where})", test)):
        if table:
            print(f"\n{title}:")
            for name, summary in table.items():
                if summary:
                    print(f"  {name:18s} R@0.3={summary['R@0.3']:.3f}  AP50={summary.get('AP50', float('nan')):.3f}")
    if final:
        print(f"\nfinal model: {final['stage']} (best validation {final['select']} {final['val']:.3f}) -> "
              f"{final['checkpoint']}")
    print(json.dumps({"summary": str(Path(cfg["out"]) / "summary.json")}))


if __name__ == "__main__":
    sys.exit(main())
