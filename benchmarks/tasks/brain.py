"""Two tasks on axial slices of nilearn's MNI152 (2009a) T1 template: tissue segmentation and slice level.

`brain_tissue`: background / grey / white matter per pixel.

Labels come from the template's own grey- and white-matter probability maps: each pixel takes the
most probable of background (1 - GM - WM), GM and WM after resizing. The three volumes share one
grid, are read with `medssl.data.imaging.read_nifti` (slices in its S->I order) and are cropped to
the brain's bounding box (one box for all slices).

Splits are by slab: consecutive slices form slabs of `slab` slices, a `gap` of slices between slabs
is dropped so that no two neighbouring slices sit in different splits, and slabs are dealt out
cyclically train, val, train, test, so every split spans the brain from bottom to top.

`brain_level`: which of 4 levels of the brain (vertex to skull base) an axial slice comes from, with
each slice in a seeded random view (scale, rotation, shift, gamma) so that its size, place and
contrast do not give the level away. A task that needs anatomy, not an intensity threshold. Same
slab splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.tasks import TaskData
from medssl.data.imaging import iter_slices, normalise, read_nifti, resize_square

PATTERN = ("train", "val", "train", "test")
CLASSES = ["background", "grey matter", "white matter"]


def mni_files() -> dict[str, Path]:
    """Paths of the T1, GM and WM templates that nilearn ships (no download)."""
    import nilearn

    root = Path(nilearn.__file__).parent / "datasets" / "data"
    files = {k: root / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    for k, p in files.items():
        if not p.is_file():
            raise FileNotFoundError(f"{p}: nilearn's MNI152 {k} template is missing (pip install nilearn)")
    return files


def _mni_slices(min_brain: float) -> tuple[list, np.ndarray, np.ndarray]:
    """Axial slices of the MNI152 T1 in [0, 1] (S->I order) holding enough brain, and the GM / WM maps.

    Y and X are cropped to the brain's bounding box over the whole volume (+ margin), one box for all slices.
    """
    f = mni_files()
    t1 = read_nifti(f["t1"], "MR")
    gm = read_nifti(f["gm"], "MR").pixels
    wm = read_nifti(f["wm"], "MR").pixels
    t1_01, _ = normalise(t1)  # [Z, Y, X] in [0, 1]
    brain = (gm + wm) > 0.1  # [Z, Y, X]
    ys, xs = np.flatnonzero(brain.any(axis=(0, 2))), np.flatnonzero(brain.any(axis=(0, 1)))
    y0, y1 = max(0, ys[0] - 4), min(brain.shape[1], ys[-1] + 5)
    x0, x1 = max(0, xs[0] - 4), min(brain.shape[2], xs[-1] + 5)
    t1_01, gm, wm = (v[:, y0:y1, x0:x1] for v in (t1_01, gm, wm))
    kept = [s for s in iter_slices(t1_01, t1.spacing, axis=0)
            if float(((gm[s.index] + wm[s.index]) > 0.5).mean()) >= min_brain]
    if not kept:
        raise ValueError("MNI152: no slice has enough brain; lower min_brain")
    return kept, gm, wm


def _slab(rank: int, slab: int, gap: int, step: int) -> tuple[int, bool]:
    """(slab number, kept?) of the slice at `rank` from the first kept slice."""
    block, within = divmod(rank, slab + gap)
    return block, within < slab and within % step == 0


def _split(images: list[np.ndarray], targets: list, splits: list[str], groups: list[str], targets_dtype=torch.long
           ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[str]]]:
    x = torch.from_numpy(np.stack(images)).float()[:, None]  # [N, 1, S, S]
    y = torch.as_tensor(np.stack(targets), dtype=targets_dtype)
    sp = np.array(splits)
    out = {k: (x[torch.from_numpy(sp == k)], y[torch.from_numpy(sp == k)]) for k in ("train", "val", "test")}
    grp = {k: [g for g, s in zip(groups, splits) if s == k] for k in out}
    return out, grp


def brain_tissue(img_size: int = 64, slab: int = 8, gap: int = 2, step: int = 1, min_brain: float = 0.05
                 ) -> TaskData:
    """Build the task.

    Args:
        img_size: square output size (whole slice padded, then resized).
        slab: slices per slab; gap: slices dropped between slabs.
        step: use every `step`-th slice inside the slabs.
        min_brain: keep slices where GM + WM cover at least this fraction of the slice.
    """
    if slab < 1 or gap < 0 or step < 1:
        raise ValueError(f"slab >= 1, gap >= 0, step >= 1 required; got {slab}, {gap}, {step}")
    kept, gm, wm = _mni_slices(min_brain)
    first = kept[0].index
    images, masks, splits, groups = [], [], [], []
    for s in kept:
        block, use = _slab(s.index - first, slab, gap, step)
        if not use:
            continue
        g, w = gm[s.index], wm[s.index]
        probs = [np.clip(1.0 - g - w, 0.0, 1.0), g, w]
        probs = np.stack([resize_square(p.astype(np.float32), img_size, fit="pad") for p in probs])
        images.append(resize_square(s.pixels, img_size, fit="pad"))
        masks.append(probs.argmax(0))
        splits.append(PATTERN[block % len(PATTERN)])
        groups.append(f"slab{block}")
    out, grp = _split(images, masks, splits, groups)
    return TaskData("brain_tissue", "segmentation", "MNI152 T1 (nilearn)", 3, CLASSES, out, grp,
                    {"slab": slab, "gap": gap, "step": step, "plane": "axial"})


def _jitter(image: np.ndarray, rng: np.random.Generator, scale: tuple[float, float], shift: float,
            rotate: float, gamma: tuple[float, float]) -> np.ndarray:
    """One seeded view of a [S, S] slice in [0, 1]: isotropic scale, rotation, shift (zero fill), then gamma."""
    s = rng.uniform(*scale)
    a = np.deg2rad(rng.uniform(-rotate, rotate))
    tx, ty = rng.uniform(-shift, shift, size=2)
    # affine_grid maps output coords to input coords: inverse of "scale by s, rotate by a, shift by t"
    c, si = np.cos(a) / s, np.sin(a) / s
    theta = torch.tensor([[c, -si, -tx], [si, c, -ty]], dtype=torch.float32)[None]
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return np.clip(out[0, 0].numpy(), 0.0, 1.0) ** rng.uniform(*gamma)


def brain_level(img_size: int = 64, levels: int = 4, slab: int = 4, gap: int = 2, step: int = 1,
                min_brain: float = 0.05, scale: tuple[float, float] = (0.75, 1.25), shift: float = 0.1,
                rotate: float = 15.0, gamma: tuple[float, float] = (0.7, 1.4), views: int = 2, seed: int = 0
                ) -> TaskData:
    """Build the task: which of `levels` equal-count bins of the brain's superior-inferior extent holds a slice.

    Each slice is shown in `views` seeded random views (scale, rotation, shift, gamma; every split alike), so
    the brain's size, place and contrast in the picture do not give the level away: the anatomy must.

    Args:
        img_size: square output size.
        levels: classes, from the vertex (level 1) down to the skull base.
        slab, gap, step: split by slabs of consecutive slices as in `brain_tissue`.
        min_brain: keep slices where GM + WM cover at least this fraction of the slice.
        scale, shift, rotate, gamma: ranges of the seeded views (shift as a fraction of the half-width, degrees).
        views: views per slice (all in the slice's split); seed: seed of the views.
    """
    if slab < 1 or gap < 0 or step < 1 or levels < 2 or views < 1:
        raise ValueError(f"slab >= 1, gap >= 0, step >= 1, levels >= 2, views >= 1 required; got {slab}, {gap}, "
                         f"{step}, {levels}, {views}")
    kept, _, _ = _mni_slices(min_brain)
    first, rng = kept[0].index, np.random.default_rng(seed)
    images, labels, splits, groups = [], [], [], []
    for rank, s in enumerate(kept):
        base = resize_square(s.pixels, img_size, fit="pad")
        seen = [_jitter(base, rng, scale, shift, rotate, gamma) for _ in range(views)]  # drawn for every slice
        block, use = _slab(s.index - first, slab, gap, step)
        if not use:
            continue
        for view in seen:
            images.append(view.astype(np.float32))
            labels.append(rank * levels // len(kept))  # kept slices run S -> I
            splits.append(PATTERN[block % len(PATTERN)])
            groups.append(f"slab{block}")
    out, grp = _split(images, labels, splits, groups)
    names = [f"level {i + 1}" + (" (vertex)" if i == 0 else " (skull base)" if i == levels - 1 else "")
             for i in range(levels)]
    return TaskData("brain_level", "classification", "MNI152 T1 (nilearn), seeded views", levels, names, out, grp,
                    {"slab": slab, "gap": gap, "step": step, "plane": "axial", "slices": len(kept),
                     "view": {"scale": list(scale), "shift": shift, "rotate": rotate, "gamma": list(gamma),
                              "views": views, "seed": seed}})
