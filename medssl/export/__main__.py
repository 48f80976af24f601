"""`python -m medssl.export SOURCE --format onnx|hf|bundle --out DIR`; `python -m medssl.export check DIR [IMAGES]`."""

from __future__ import annotations

import argparse
import json
import sys

from medssl.export.onnx import DEFAULT_RTOL


def _export_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medssl-export", description="Export a backbone, a transfer head or a "
                                "MedMask detector (ONNX checked in ONNX Runtime; HF-style folder with a card).")
    p.add_argument("source", help="a medssl.load_backbone source, a head checkpoint (head.pt / model.pt / best.pt) "
                   "or a MedMask stage checkpoint")
    p.add_argument("--format", choices=("onnx", "hf", "bundle"), default="onnx",
                   help="onnx: model.onnx + medssl_export.json; hf: config.json + model.safetensors + README.md "
                   "(backbones); bundle: a MONAI bundle (configs/, models/model.pt + model.onnx, docs/README.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="backbone: size to build for; detector: its nominal size (multiples of 32); with --static "
                   "the one size the graph takes")
    p.add_argument("--static", action="store_true", help="fix H and W in the ONNX graph (batch stays dynamic)")
    p.add_argument("--top-k", type=int, help="detector: detections per image in the graph")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help="parity tolerance relative to the output scale (default %(default)s)")
    p.add_argument("--data-card", help="a data card (markdown) to quote in the model card (README.md)")
    p.add_argument("--stats", help="the shards' stats.json, summarised in the model card")
    return p.parse_args(argv)


def _check_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medssl-export check", description="Re-run ONNX Runtime vs PyTorch parity "
                                "of an export on your images (random probes when none are given).")
    p.add_argument("folder", help="export folder (model.onnx + medssl_export.json)")
    p.add_argument("images", nargs="*", help="image files or folders")
    p.add_argument("--source", help="the PyTorch model, where the export's recorded source has moved")
    p.add_argument("--rtol", type=float)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medssl-export`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        from medssl.export.runner import check

        a = _check_args(argv[1:])
        records = check(a.folder, a.images, a.source, a.rtol)
        for r in records:
            print(json.dumps(r))
        bad = sum(not r["ok"] for r in records)
        print(f"{len(records) - bad} passed, {bad} failed (ONNX Runtime vs PyTorch)")
        return 1 if bad else 0
    a = _export_args(argv)
    from medssl.export.sources import load_exportable

    exp = load_exportable(a.source, size=tuple(a.size) if a.size else None, top_k=a.top_k, static=a.static)
    if a.format == "onnx":
        from medssl.export.onnx import META_NAME, export_onnx

        path = export_onnx(exp, a.out, rtol=a.rtol)
        meta = json.loads((path.parent / META_NAME).read_text())
        from medssl.export.card import card_for

        usage = "\n".join(["```bash", f"python -m medssl.export check {a.out} IMAGES...   # parity on your images",
                           *([f"python recipes/medmask_detect.py predict --onnx {path} IMAGES..."]
                             if exp.kind == "detector" else []), "```",
                           f"Inputs, outputs and pre/post-processing: `{META_NAME}`."])
        (path.parent / "README.md").write_text(card_for(exp, usage, stats=a.stats, data_card=a.data_card))
        print(f"wrote {path} (max abs difference ONNX Runtime vs PyTorch {meta['parity']['max_abs_diff']:.2e}, "
              f"tolerance {max(c['tolerance'] for c in meta['parity']['probes']):.2e})")
    elif a.format == "hf":
        from medssl.export.hf import export_hf

        print(f"wrote {export_hf(exp, a.out, data_card=a.data_card, stats=a.stats)}")
    else:
        from medssl.export.bundle import export_bundle

        print(f"wrote {export_bundle(exp, a.out, rtol=a.rtol, data_card=a.data_card, stats=a.stats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
