"""Synthetic screening mammograms with COCO lesion boxes: the `--dataset demo` of the MedMask recipe.

    python -m data_tools.make_demo mammo --out demo_data/mammo

Writes, deterministically for a given ``--seed``, the seed layout under ``OUT/demo``::

    annotations/instances_{train,val,test,target}.json   (target: images only, no annotations)
    images/{train,val,test,target}/*.png                 (16-bit greyscale)
    embeddings/<stem>_embedding.npy                      (expert embeddings, see extract_embeddings)
    _info.json                                           (the arguments; written last = complete)

Each image: a breast (half-ellipse against the chest wall, left or right view, with a pectoral
muscle), fibroglandular texture from filtered noise, skin line and quantum noise. Lesions (one COCO
category, ``lesion``; the kind is in ``lesion_type``): round masses, spiculated masses and clusters of
micro-calcifications. Most images are normal, as in screening. ``train`` comes from "vendor A";
``val``, ``test`` and the unlabelled ``target`` split from "vendor B" (other gamma, contrast, noise and
texture scale), so the three MedMask stages have a domain gap to bridge, as DDSM -> INBreast.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

SPLITS = ("train", "val", "test", "target")


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
    parser.add_argument("--abnormal-frac", type=float, default=0.4, help="fraction of images with lesions")
    parser.add_argument("--shift", type=float, default=0.5,
                        help="domain gap of vendor B, 0 = none, 1 = strong")
    parser.add_argument("--expert", default="vit_tiny_patch16",
                        help="backbone for the expert embeddings (anything medssl.load_backbone accepts; "
                             "a registry name is a seeded random init); 'none' skips them")
    parser.add_argument("--embed-size", type=int, default=64, help="expert input size (square)")
    parser.add_argument("--embed-grid", type=int, default=4,
                        help="expert tokens pooled to GRID x GRID (+ cls)")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------- rendering
def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (smooth noise drawn at low resolution)."""
    f = max(1, int(sigma // 2))  # filter at 1/f resolution, then upsample: same look, much faster
    small = (-(-shape[0] // f), -(-shape[1] // f))
    n = ndimage.gaussian_filter(rng.standard_normal(small), sigma / f, mode="wrap")
    if f > 1:  # bilinear upsampling through PIL (much faster than ndimage.zoom)
        from PIL import Image

        big = Image.fromarray(n.astype(np.float32)).resize((small[1] * f, small[0] * f),
                                                                      Image.Resampling.BILINEAR)
        n = np.asarray(big, dtype=np.float64)[: shape[0], : shape[1]]
    return n / (n.std() + 1e-8)


def _breast(rng: np.random.Generator, h: int, w: int, left: bool, texture_scale: float) -> tuple:
    """Breast image in [0, 1] (before the vendor look), its mask, and the lesion-allowed mask."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xw = 0.0 if left else w - 1.0  # chest wall
    cy = h * rng.uniform(0.45, 0.55)
    a, b = w * rng.uniform(0.6, 0.85), h * rng.uniform(0.38, 0.46)
    wobble = 1 + 0.02 * _noise(rng, (h, w), 25)
    r = np.sqrt(((xx - xw) / a) ** 2 + ((yy - cy) / b) ** 2) * wobble  # [H, W] 1 on the skin line
    mask = r <= 1.0
    depth = np.clip(1 - r, 0, 1)  # 0 at the skin, larger towards the chest wall
    fine = _noise(rng, (h, w), 1.5 * texture_scale)
    mid = _noise(rng, (h, w), 5 * texture_scale)
    coarse = _noise(rng, (h, w), 14 * texture_scale)
    density = rng.uniform(0.2, 0.8)  # breast density: fatty .. dense
    gland = 1 / (1 + np.exp(-(0.6 * coarse + 0.4 * mid - 1.2 + 2.0 * density)))  # [H, W] in (0, 1)
    gland *= np.clip(depth * 3, 0, 1)  # thinner tissue near the skin
    img = 0.22 + 0.28 * gland + 0.03 * fine * gland + 0.08 * np.sqrt(depth)
    img = img * (0.75 + 0.25 * np.clip(depth * 8, 0, 1))  # skin line falls off
    # pectoral muscle: bright triangle in the upper chest-wall corner (MLO view)
    dx = xx if left else (w - 1 - xx)
    mw, mh = w * rng.uniform(0.2, 0.35), h * rng.uniform(0.3, 0.5)
    muscle = (dx / mw + yy / mh) <= 1.0
    img = np.where(muscle & mask, 0.62 + 0.03 * mid, img)
    allowed = mask & ~ndimage.binary_dilation(muscle, iterations=8) & (depth > 0.08)
    return np.where(mask, img, 0.0), mask, allowed


def _mass(rng: np.random.Generator, img: np.ndarray, cy: float, cx: float, spiculated: bool) -> list[float]:
    """Add a round or spiculated mass at (cy, cx); returns its box xywh (pixels)."""
    h, w = img.shape
    r = rng.uniform(5, 10) if spiculated else rng.uniform(6, 15)
    ratio, theta = rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # [H, W] each
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    ang = np.arctan2(v, u)
    edge = 1 + 0.12 * np.sin(3 * ang + rng.uniform(0, 6)) * rng.uniform(0, 1)  # lobulated margin
    d = np.sqrt((u / r) ** 2 + (v / (r * ratio)) ** 2) / edge  # [H, W]
    amp = rng.uniform(0.18, 0.3)
    blob = amp * np.clip(1 - d**2, 0, None) ** 0.7
    if spiculated:  # thin radiating lines, drawn together and blurred once
        lines = np.zeros_like(img)
        for phi in rng.uniform(0, 2 * np.pi, int(rng.integers(8, 16))):
            length = r * rng.uniform(1.4, 2.4)
            t = np.linspace(0.6 * r, length, int(length * 2))
            py, px = cy + t * np.sin(phi), cx + t * np.cos(phi)
            ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
            iy, ix = py[ok].astype(int), px[ok].astype(int)
            lines[iy, ix] = np.maximum(lines[iy, ix], amp * 0.8 * (1 - t[ok] / length) + 0.02)
        blob = np.maximum(blob, ndimage.gaussian_filter(lines, 0.6) * 2.5)
    img += blob
    ys, xs = np.nonzero(blob > 0.08 * amp)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _calcifications(rng: np.random.Generator, img: np.ndarray, cy: float, cx: float) -> list[float]:
    """Add a cluster of 5-15 micro-calcifications around (cy, cx); returns its box xywh."""
    h, w = img.shape
    n, spread = int(rng.integers(5, 16)), rng.uniform(4, 10)
    pts = np.stack([cy, cx]) + rng.normal(0, spread, (n, 2))
    pts = np.clip(pts, [1, 1], [h - 2, w - 2])
    dots = np.zeros_like(img)
    dots[pts[:, 0].astype(int), pts[:, 1].astype(int)] = rng.uniform(0.6, 1.0, n)
    img += 0.9 * ndimage.gaussian_filter(dots, rng.uniform(0.6, 0.9)) * 4
    y0, x0 = np.floor(pts.min(0)) - 2
    y1, x1 = np.ceil(pts.max(0)) + 3
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _vendor(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, vendor_b: bool, shift: float):
    """Apply the acquisition 'look' (gamma, contrast, noise) of vendor A or B; returns [0, 1] floats."""
    gamma, contrast, noise = (1 - 0.35 * shift, 1 - 0.25 * shift, 0.012 + 0.02 * shift) if vendor_b else (
        1.0, 1.0, 0.012)
    out = np.clip(img, 0, 1) ** gamma
    out = (out - 0.4) * contrast + 0.4
    out = out + rng.normal(0, noise, img.shape)
    return np.where(mask, np.clip(out, 0.02, 1.0), 0.0)


def render(rng: np.random.Generator, h: int, w: int, abnormal: bool, vendor_b: bool, shift: float
           ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """One synthetic mammogram: ``(image [H, W] in [0, 1], lesions [{bbox, lesion_type}], meta)``."""
    left = bool(rng.integers(2))
    img, mask, allowed = _breast(rng, h, w, left, 1 + 0.4 * shift if vendor_b else 1.0)
    lesions: list[dict[str, Any]] = []
    if abnormal:
        ys, xs = np.nonzero(ndimage.binary_erosion(allowed, iterations=14))
        if len(ys) == 0:
            ys, xs = np.nonzero(allowed)
        for _ in range(1 if rng.uniform() < 0.75 else 2):
            j = int(rng.integers(len(ys)))
            kind = ["mass_round", "mass_spiculated", "calcifications"][int(rng.integers(3))]
            if kind == "calcifications":
                box = _calcifications(rng, img, ys[j], xs[j])
            else:
                box = _mass(rng, img, ys[j], xs[j], kind == "mass_spiculated")
            lesions.append({"bbox": box, "lesion_type": kind})
    out = _vendor(rng, img, mask, vendor_b, shift)
    return out, lesions, {"view": "L" if left else "R", "vendor": "B" if vendor_b else "A"}


# ------------------------------------------------------------------------------------- writing
def _write_png16(path: Path, img01: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(img01 * 65535).astype(np.uint16)).save(path, compress_level=1)


def generate(out: Path, *, seed: int, height: int, width: int, counts: dict[str, int], abnormal_frac: float,
             shift: float) -> dict[str, int]:
    """Write images and COCO files of all splits under ``out`` (= DATA_ROOT/demo); returns lesion counts."""
    if height < 64 or width < 64:
        raise ValueError(f"--height/--width must be >= 64, got {height}x{width}")
    if not 0 <= abnormal_frac <= 1:
        raise ValueError(f"--abnormal-frac must be in [0, 1], got {abnormal_frac}")
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    n_lesions = {}
    for s_idx, split in enumerate(SPLITS):
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        n_abn = round(counts[split] * abnormal_frac)
        order = np.random.default_rng([seed, s_idx, 999]).permutation(counts[split])
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, s_idx, i])
            img, lesions, meta = render(rng, height, width, bool(order[i] < n_abn), split != "train", shift)
            image_id = (s_idx + 1) * 100000 + i
            name = f"{split}_{i:05d}.png"
            _write_png16(img_dir / name, img)
            images.append({"id": image_id, "file_name": name, "height": height, "width": width, **meta})
            for les in lesions:
                x, y, bw, bh = les["bbox"]
                anns.append({"id": len(anns) + 1 + image_id * 10, "image_id": image_id, "category_id": 1,
                             "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                             "lesion_type": les["lesion_type"]})
        coco = {"info": {"description": f"medssl synthetic mammography demo, split {split}", "seed": seed},
                "images": images, "categories": [{"id": 1, "name": "lesion", "supercategory": "lesion"}]}
        if split != "target":  # the target split is unlabelled: a COCO file without annotations
            coco["annotations"] = anns
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        n_lesions[split] = len(anns)
    return n_lesions


def run(args: argparse.Namespace) -> int:
    """Generate the demo set (see the module docstring); returns 0."""
    t0 = time.time()
    out = Path(args.out) / "demo"
    info = out / "_info.json"
    info.unlink(missing_ok=True)  # incomplete until rewritten at the end
    counts = {s: int(getattr(args, s)) for s in SPLITS}
    if min(counts.values()) < 1:
        raise ValueError(f"every split needs at least one image, got {counts}")
    n_lesions = generate(out, seed=args.seed, height=args.height, width=args.width, counts=counts,
                         abnormal_frac=args.abnormal_frac, shift=args.shift)
    expert = str(args.expert)
    if expert.lower() != "none":
        from data_tools.extract_embeddings import extract_embeddings

        files = sorted((out / "images").rglob("*.png"))
        extract_embeddings(expert, files, out / "embeddings", grid=args.embed_grid, img_size=args.embed_size,
                           seed=args.seed)
    record = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "images": counts,
              "lesions": n_lesions, "seconds": round(time.time() - t0, 1)}
    info.write_text(json.dumps(record, indent=1))
    print(f"demo mammography set written to {out}: images {counts}, lesions {n_lesions}, "
          f"{record['seconds']} s")
    return 0


def ensure_demo(root: str | Path) -> Path:
    """Generate the demo set under ``root`` (= DATA_ROOT) with the default options unless it is complete.

    Returns ``root/demo``. A set is complete once its ``_info.json`` is written (the last step).
    """
    out = Path(root) / "demo"
    if not (out / "_info.json").is_file():
        print(f"generating the synthetic mammography demo set under {root} (once)")
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        run(parser.parse_args(["--out", str(root)]))
    return out
