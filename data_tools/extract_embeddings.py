"""Expert (VFM) embeddings for MedMask's contrastive distillation, one ``<stem>_embedding.npy`` per image.

    python -m data_tools.extract_embeddings --model SOURCE --images DIR --out DIR [--grid 4]

``SOURCE`` is anything ``medssl.load_backbone`` accepts (a backbone folder, a checkpoint file, or a
registry name = random init, seeded by ``--seed``). Each file holds float32 ``(Q, D)`` with
L2-normalised rows: the cls token followed by the patch tokens average-pooled to ``grid x grid``
(``--grid 0``: every patch token). ``--model biomedparse:CKPT`` asks for BiomedParse (101 x 512 in the
MedMask paper): it needs the BiomedParse package and a local checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medssl.data.coco import IMAGE_EXTS, read_image


def load_expert(source: str, *, img_size: int, seed: int = 0) -> torch.nn.Module:
    """A ViT expert with one input channel at ``img_size`` from ``source`` (see the module docstring)."""
    if source.lower().startswith("biomedparse"):
        ckpt = source.split(":", 1)[1] if ":" in source else ""
        if importlib.util.find_spec("biomedparse") is None and importlib.util.find_spec("modeling") is None:
            raise ImportError("BiomedParse is not installed (https://github.com/microsoft/BiomedParse); "
                              "install it and pass --model biomedparse:/path/to/biomedparse_v1.pt, or use "
                              "a medssl/timm backbone as the expert")
        if not ckpt or not Path(ckpt).is_file():
            raise FileNotFoundError(f"BiomedParse checkpoint not found: {ckpt!r} "
                                    "(pass biomedparse:/local/file.pt; "
                                    "nothing is downloaded)")
        raise NotImplementedError("BiomedParse is installed, but medssl does not drive it: run MedMask's "
                                  "generate_embedings.py with it; its <stem>_embedding.npy files are "
                                  "read as is")
    from medssl.hub import load_backbone

    torch.manual_seed(seed)  # a registry name is a random init: make it reproducible
    return load_backbone(source, img_size=img_size, in_chans=1).eval()


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, grid: int) -> torch.Tensor:
    """``images`` [B, 1, S, S] -> L2-normalised tokens [B, Q, D] (cls + grid x grid pooled patches)."""
    tokens = model.forward_features(images)  # [B, P + L, D]
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    patches = tokens[:, n_prefix:]  # [B, L, D]
    gh, gw = model.patch_embed.grid_size
    if grid > 0:
        fmap = patches.transpose(1, 2).reshape(len(images), -1, gh, gw)  # [B, D, gh, gw]
        patches = F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)  # [B, g*g, D]
    out = torch.cat([tokens[:, :n_prefix], patches], dim=1) if n_prefix else patches  # [B, Q, D]
    return F.normalize(out.float(), dim=-1)


def extract_embeddings(source: str, files: Sequence[str | Path], out_dir: str | Path, *, grid: int = 4,
                       img_size: int = 224, seed: int = 0, batch_size: int = 16) -> list[Path]:
    """Write ``out_dir/<stem>_embedding.npy`` for each image file; returns the paths written.

    Images are read as grey [0, 1] (``medssl.data.coco.read_image``), resized to ``img_size`` square
    and normalised with the backbone's own mean / std (``model.medssl_cfg``). Stems must be unique.
    """
    files = [Path(f) for f in files]
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
        raise ValueError(f"image stems must be unique (embeddings are named by stem); duplicates: {dup}")
    model = load_expert(source, img_size=img_size, seed=seed)
    cfg = getattr(model, "medssl_cfg", {})
    mean, std = float(np.mean(cfg.get("mean", [0.5]))), float(np.mean(cfg.get("std", [0.25])))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        ims = [torch.from_numpy(read_image(f))[None, None] for f in chunk]  # each [1, 1, H, W]
        x = torch.cat([F.interpolate(im, size=(img_size, img_size), mode="bilinear", antialias=True,
                                     align_corners=False) for im in ims])  # [B, 1, S, S]
        emb = embed(model, (x - mean) / std, grid).numpy().astype(np.float32)  # [B, Q, D]
        for f, e in zip(chunk, emb):
            path = out_dir / f"{f.stem}_embedding.npy"
            np.save(path, e)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m data_tools.extract_embeddings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="backbone folder / checkpoint / registry name, or biomedparse:CKPT")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for <stem>_embedding.npy")
    p.add_argument("--grid", type=int, default=4, help="pool patch tokens to GRID x GRID; 0 keeps all")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    folder = Path(args.images)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: folder not found: {folder}")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"--images: no images ({', '.join(IMAGE_EXTS)}) under {folder}")
    written = extract_embeddings(args.model, files, args.out, grid=args.grid, img_size=args.img_size,
                                 seed=args.seed, batch_size=args.batch_size)
    shape = np.load(written[0]).shape
    print(f"wrote {len(written)} embeddings of shape {shape} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
