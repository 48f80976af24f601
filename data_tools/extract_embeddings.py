"""Expert (VFM) embeddings for MedMask's contrastive distillation, one ``<stem>_embedding.npy`` per image.

    python -m data_tools.extract_embeddings --model SOURCE --images DIR --out DIR [--grid 4] [--workers 4]
    torchrun --nproc_per_node 4 -m data_tools.extract_embeddings --model SOURCE --images DIR --out DIR

``SOURCE`` is one of

- anything ``medssl.load_backbone`` accepts: a backbone folder (e.g. the ``backbone/`` an MAE pretraining run
  writes, so the expert can be an MAE pretrained on the task's own unlabelled images), a checkpoint file, or
  a registry name (random init seeded by ``--seed``: an ablation, not an expert). Each file holds float32
  ``(Q, D)``, L2-normalised rows: the cls token followed by the patch tokens average-pooled to
  ``grid x grid`` (``Q = 1 + grid**2``; ``--grid 0``: every patch token);
- ``open_clip:DIR``: a local open_clip model folder (``open_clip_config.json`` + weights, the layout of
  open_clip's hub models, BiomedCLIP included). Only the image tower is built; each file holds its
  L2-normalised image embedding, float32 ``(1, embed_dim)``. Needs ``pip install open-clip-torch``.

BiomedParse (the MedMask paper's expert, ``(101, 512)``) is not driven from here: run MedMask's
``generate_embedings.py`` in BiomedParse's own environment; its ``<stem>_embedding.npy`` files are read as
they are. Nothing is downloaded.

At scale: images are read, resized and batched by ``--workers`` loader processes; files already written are
skipped (each is written atomically; ``--overwrite`` recomputes them, and an image newer than its
embedding is always redone; a resumed run recomputes the killed run's batches, so the files it writes are the
bytes the uninterrupted run would have written); an unreadable image is recorded and skipped; under ``torchrun`` each
rank embeds every ``WORLD_SIZE``-th file on its own device. ``OUT/manifest.jsonl`` lists every image
(``written`` / ``exists`` / ``skipped`` + reason) and ``OUT/_expert.json`` the expert, so that a resumed run
cannot mix two experts in one folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from medssl.data.coco import IMAGE_EXTS, read_image

log = logging.getLogger("medssl")
EXPERT_FILE, MANIFEST = "_expert.json", "manifest.jsonl"


@dataclass
class Expert:
    """An embedding function with its input size.

    Attributes:
        img_size: square input size in pixels.
        embed: grey images ``[B, 1, S, S]`` in [0, 1] -> L2-normalised rows ``[B, Q, D]``.
        device: where ``embed`` wants its input.
    """

    img_size: int
    embed: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, grid: int) -> torch.Tensor:
    """``images`` [B, 1, S, S] (normalised) -> L2-normalised tokens [B, Q, D] (cls + grid x grid pooled patches)."""
    tokens = model.forward_features(images)  # [B, P + L, D]
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    patches = tokens[:, n_prefix:]  # [B, L, D]
    gh, gw = model.patch_embed.grid_size
    if grid > 0:
        fmap = patches.transpose(1, 2).reshape(len(images), -1, gh, gw)  # [B, D, gh, gw]
        patches = F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)  # [B, g*g, D]
    out = torch.cat([tokens[:, :n_prefix], patches], dim=1) if n_prefix else patches  # [B, Q, D]
    return F.normalize(out.float(), dim=-1)


def _backbone_expert(source: str, img_size: int, grid: int, seed: int, device: torch.device) -> Expert:
    from medssl.hub import load_backbone

    torch.manual_seed(seed)  # a registry name is a random init: make it reproducible
    model = load_backbone(source, img_size=img_size, in_chans=1).eval().to(device)
    cfg = getattr(model, "medssl_cfg", {})
    mean, std = float(np.mean(cfg.get("mean", [0.5]))), float(np.mean(cfg.get("std", [0.25])))
    return Expert(img_size, lambda x: embed(model, (x - mean) / std, grid), device)  # [B, Q, D]


def _open_clip_expert(folder: str, device: torch.device) -> Expert:
    """The image tower of a local open_clip model folder (``open_clip_config.json`` + one weights file)."""
    from medssl.train.checkpoint import load_checkpoint, load_exact, strip_prefixes

    root = Path(folder)
    config = root / "open_clip_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"open_clip:{folder}: no open_clip_config.json there (expected a local open_clip "
                                "model folder: open_clip_config.json + open_clip_pytorch_model.bin or "
                                "*.safetensors; nothing is downloaded)")
    weights = sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")) + sorted(root.glob("*.pt*"))
    if not weights:
        raise FileNotFoundError(f"open_clip:{folder}: no weights file (*.safetensors, *.bin, *.pt, *.pth)")
    try:
        from open_clip.model import _build_vision_tower  # the tower CLIP / CustomTextCLIP build as `.visual`
    except ImportError as exc:
        raise ImportError("--model open_clip:... needs open_clip: pip install open-clip-torch") from exc
    full = json.loads(config.read_text())
    cfg, pre = full.get("model_cfg", full), full.get("preprocess_cfg", {})
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
    state = load_checkpoint(weights[0])
    state = strip_prefixes(state.get("state_dict", state), ("module.",))
    load_exact(visual, {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")},
               f"{weights[0]} (image tower)")
    visual = visual.eval().to(device)
    size = visual.image_size if hasattr(visual, "image_size") else cfg["vision_cfg"].get("image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = torch.tensor(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        feats = visual((x.expand(-1, 3, -1, -1) - mean) / std)  # [B, 3, S, S] -> [B, embed_dim]
        return F.normalize(feats.float(), dim=-1)[:, None]  # [B, 1, embed_dim]

    return Expert(size, run, device)


def load_expert(source: str, *, img_size: int = 224, grid: int = 4, seed: int = 0,
                device: str | torch.device = "cpu") -> Expert:
    """The expert named by ``source`` (see the module docstring) on ``device``."""
    device = torch.device(device)
    scheme = source.split(":", 1)[0].lower() if ":" in source else ""
    if scheme == "open_clip":
        return _open_clip_expert(source.split(":", 1)[1], device)
    if scheme == "biomedparse":
        raise ValueError("BiomedParse is not run by medssl: generate its (101, 512) <stem>_embedding.npy files with "
                         "MedMask's generate_embedings.py in BiomedParse's environment; MedMask reads them as they "
                         "are (see docs/medmask.md, expert embeddings)")
    return _backbone_expert(source, img_size, grid, seed, device)


class _Images(Dataset):
    """Image ``i`` read as grey [1, S, S] in [0, 1], or the reason it cannot be."""

    def __init__(self, files: Sequence[Path], size: int):
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, square_image(self.files[i], self.size), ""  # [1, S, S]
        except Exception as exc:  # unreadable, truncated, wrong format
            return i, None, f"{type(exc).__name__}: {exc}"


def square_image(path: str | Path, size: int) -> torch.Tensor:
    """An image as the experts see it: grey [1, S, S] in [0, 1], stretched to the square (antialiased bilinear).

    Raises:
        ValueError: the image is smaller than 2 x 2 or holds non-finite values (read errors propagate).
    """
    img = torch.from_numpy(read_image(path))[None, None]  # [1, 1, H, W]
    if min(img.shape[-2:]) < 2 or not bool(img.isfinite().all()):
        raise ValueError(f"{path}: image of shape {tuple(img.shape[-2:])} is empty or not finite")
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _atomic_write(path: Path, data: bytes | np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        if isinstance(data, np.ndarray):
            np.save(f, data, allow_pickle=False)
        else:
            f.write(data)
    os.replace(tmp, path)


def _check_expert(out: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Record the expert in ``out``; refuse a folder that holds another expert's embeddings (unless overwriting)."""
    f = out / EXPERT_FILE
    if f.is_file() and not overwrite:
        old = json.loads(f.read_text())
        if old != record:
            raise ValueError(f"{out} holds embeddings of another expert ({old}), not {record}: use another --out "
                             "or --overwrite")
    else:
        _atomic_write(f, json.dumps(record, indent=1).encode())


def _part(out: Path, rank: int) -> Path:
    return out / f".manifest-rank{rank}.jsonl"


def merge_manifests(out_dir: str | Path, world_size: int, wait_s: float | None = None) -> list[dict[str, Any]]:
    """Merge the ranks' manifest parts into ``out_dir/manifest.jsonl`` (sorted by image) and remove them.

    Args:
        out_dir: the embeddings folder.
        world_size: ranks whose parts must be there.
        wait_s: wait up to this long for missing parts (None: forever, polling every second).
    """
    out = Path(out_dir)
    parts = [_part(out, r) for r in range(world_size)]
    t0 = time.monotonic()
    while not all(p.is_file() for p in parts):
        if wait_s is not None and time.monotonic() - t0 > wait_s:
            raise FileNotFoundError(f"manifest parts missing: {[str(p) for p in parts if not p.is_file()]}")
        time.sleep(1.0)
    rows = [json.loads(line) for p in parts for line in p.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["image"])
    _atomic_write(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows).encode())
    for p in out.glob(".manifest-rank*.jsonl"):
        p.unlink()
    return rows


def extract_embeddings(source: str, files: Sequence[str | Path], out_dir: str | Path, *, grid: int = 4,
                       img_size: int = 224, seed: int = 0, batch_size: int = 16, num_workers: int = 0,
                       device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                       progress: bool = True, overwrite: bool = False) -> list[dict[str, Any]]:
    """Write ``out_dir/<stem>_embedding.npy`` for this rank's share of ``files``; returns its manifest rows.

    Images are read as grey [0, 1] (``medssl.data.coco.read_image``) and resized to the expert's square
    input (backbone experts: ``img_size``). Rank ``r`` of ``world_size`` takes ``files[r::world_size]``,
    writes its rows to a manifest part, and with one rank merges it into ``manifest.jsonl`` at once
    (several ranks: ``merge_manifests`` on rank 0). Stems must be unique. An embedding newer than its
    image is kept (``exists``) unless ``overwrite``; one older than its image is recomputed.

    Each row: ``{"image", "embedding", "status": "written" | "exists" | "skipped", "reason", "shape", "rank"}``.
    """
    from tqdm import tqdm

    files = [Path(f) for f in files]
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
        raise ValueError(f"image stems must be unique (embeddings are named by stem); duplicates: {dup}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_expert(out, {"source": source, "grid": grid, "img_size": img_size, "seed": seed}, overwrite)
    mine = files[rank::world_size]
    target = [out / f"{f.stem}_embedding.npy" for f in mine]
    rows: dict[int, dict[str, Any]] = {}
    for i, (f, t) in enumerate(zip(mine, target)):
        if not overwrite and t.is_file() and t.stat().st_mtime_ns >= f.stat().st_mtime_ns:
            rows[i] = {"image": str(f), "embedding": str(t), "status": "exists", "reason": "", "rank": rank}
    # A resumed run recomputes whole batches of the uninterrupted run (this rank's files in fixed chunks of
    # ``batch_size``) and writes only the missing files: kernels whose last bits depend on the batch (oneDNN's
    # AMX / AVX-512 paths) then give the same bytes as the run that was killed.
    batches = [list(range(b, min(b + batch_size, len(mine)))) for b in range(0, len(mine), batch_size)]
    batches = [b for b in batches if any(i not in rows for i in b)]
    if batches:
        expert = load_expert(source, img_size=img_size, grid=grid, seed=seed, device=device)
        images = _Images(mine, expert.img_size)
        loader = DataLoader(images, batch_sampler=batches, num_workers=num_workers, collate_fn=list)
        todo = sum(i not in rows for b in batches for i in b)
        bar = tqdm(total=len(mine), initial=len(mine) - todo, disable=not progress, unit="img",
                   desc=f"embeddings (rank {rank}/{world_size})" if world_size > 1 else "embeddings")
        for items in loader:
            for i, x, why in items:
                if x is None:
                    rows[i] = {"image": str(mine[i]), "embedding": None, "status": "skipped", "reason": why,
                               "rank": rank}
                    log.warning("skipping %s: %s", mine[i], why)
            good = [(i, x) for i, x, _ in items if x is not None]
            if good:
                x = torch.stack([x for _, x in good]).to(expert.device)  # [B, 1, S, S]
                emb = expert.embed(x).cpu().numpy().astype(np.float32)  # [B, Q, D]
                for (i, _), e in zip(good, emb):
                    if i in rows:  # written before the kill: recomputed only to keep the batch as it was
                        continue
                    _atomic_write(target[i], e)
                    rows[i] = {"image": str(mine[i]), "embedding": str(target[i]), "status": "written",
                               "reason": "", "shape": list(e.shape), "rank": rank}
            bar.update(sum(1 for i, _, _ in items if rows[i]["status"] != "exists"))
        bar.close()
    result = [rows[i] for i in range(len(mine))]
    _atomic_write(_part(out, rank), "".join(json.dumps(r) + "\n" for r in result).encode())
    if world_size == 1:
        merge_manifests(out, 1, wait_s=0)
    return result


def find_images(folder: str | Path) -> list[Path]:
    """Image files (``medssl.data.coco.IMAGE_EXTS``) under ``folder``, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: folder not found: {folder}")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"--images: no images ({', '.join(IMAGE_EXTS)}) under {folder}")
    return files


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (plain python or torchrun)."""
    from medssl.train.dist import barrier
    from medssl.train.launch import launched

    p = argparse.ArgumentParser(prog="python -m data_tools.extract_embeddings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="backbone folder / checkpoint / registry name, or open_clip:DIR")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for <stem>_embedding.npy and manifest.jsonl")
    p.add_argument("--grid", type=int, default=4, help="backbones: pool patch tokens to GRID x GRID; 0 keeps all")
    p.add_argument("--img-size", type=int, default=224, help="backbones: input size (open_clip uses its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="image reading processes per rank")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU) | cpu | cuda")
    p.add_argument("--overwrite", action="store_true", help="recompute files already written (another expert)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    files = find_images(args.images)
    with launched(args, args.device) as (dist, _):
        _part(Path(args.out), dist.rank).unlink(missing_ok=True)  # a killed run's part must not be merged
        barrier(dist)
        rows = extract_embeddings(args.model, files, args.out, grid=args.grid, img_size=args.img_size,
                                  seed=args.seed, batch_size=args.batch_size, num_workers=args.workers,
                                  device=dist.device, rank=dist.rank, world_size=dist.world_size,
                                  progress=not args.no_progress and dist.is_main, overwrite=args.overwrite)
        if dist.world_size > 1 and dist.is_main:
            rows = merge_manifests(args.out, dist.world_size)  # waits for the other ranks' parts (no timeout)
    if dist.is_main:
        counts = {s: sum(r["status"] == s for r in rows) for s in ("written", "exists", "skipped")}
        shape = next((f" of shape {tuple(r['shape'])}" for r in rows if r["status"] == "written"), "")
        print(f"{len(rows)} images: {counts['written']} embeddings written{shape}, {counts['exists']} already "
              f"there, {counts['skipped']} skipped (reasons in {Path(args.out) / MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
