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
each slice's brain resized to a fixed span and shown in seeded random views (scale, rotation, shift,
gamma) so that its size, place and contrast do not give the level away. A task that needs anatomy,
not an intensity threshold. Slab splits with a wider gap (4 slices).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.tasks import TaskData
from medssl.data.imaging import Slice, iter_slices, normalise, read_nifti, resize_square

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


def subject_files() -> list[str]:
    """The test subject's files: the T1 slices are tested on, and its GM / WM maps (the same template brain)."""
    return [str(p) for p in mni_files().values()]


def _mni_slices(min_brain: float) -> tuple[list[Slice], np.ndarray, np.ndarray]:
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


def _split(images: list[np.ndarray], targets: list, splits: list[str], groups: list[str]
           ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[str]]]:
    """Stack samples into {split: (images [N, 1, S, S], integer targets)} and {split: groups}."""
    x = torch.from_numpy(np.stack(images)).float()[:, None]  # [N, 1, S, S]
    y = torch.as_tensor(np.stack(targets), dtype=torch.long)
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
                    {"slab": slab, "gap": gap, "step": step, "plane": "axial"}, test_files=subject_files())


def view(image: np.ndarray, scale: float = 1.0, angle: float = 0.0, shift: tuple[float, float] = (0.0, 0.0),
         gamma: float = 1.0, fill: float | None = None) -> np.ndarray:
    """One view of a [S, S] slice in [0, 1]: (optionally) its foreground resized so that its bounding box's longer
    side spans `fill` of the width and centred, then scaled by `scale`, rotated by `angle` degrees
    (counter-clockwise as displayed), shifted by `shift` = (right, down) in half-widths, zero fill; then `** gamma`.
    """
    size = image.shape[-1]
    k, centre = scale, np.zeros(2)
    if fill is not None:
        rows, cols = np.flatnonzero((image > 0.05).any(1)), np.flatnonzero((image > 0.05).any(0))
        if len(rows):
            extent = 2.0 * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) / size  # in [-1, 1] units
            k = scale * 2.0 * fill / extent
            centre = np.array([(cols[0] + cols[-1] + 1) / size - 1.0, (rows[0] + rows[-1] + 1) / size - 1.0])
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])  # y points down: ccw on screen
    forward = k * rot  # (x, y) of the input -> output: forward @ (p - centre) + shift
    inverse = np.linalg.inv(forward)
    theta = np.concatenate([inverse, (centre - inverse @ np.asarray(shift))[:, None]], axis=1)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    # affine_grid maps each output location (x, y in [-1, 1]) to the input location it samples
    grid = torch.nn.functional.affine_grid(torch.tensor(theta, dtype=torch.float32)[None], list(x.shape),
                                           align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return np.clip(out[0, 0].numpy(), 0.0, 1.0) ** gamma


def brain_level(img_size: int = 64, levels: int = 4, slab: int = 4, gap: int = 4, step: int = 1,
                min_brain: float = 0.05, fill: float = 0.7, scale: tuple[float, float] = (0.85, 1.15),
                shift: float = 0.1, rotate: float = 15.0, gamma: tuple[float, float] = (0.7, 1.4), views: int = 3,
                seed: int = 0) -> TaskData:
    """Build the task: which of `levels` equal-count bins of the brain's superior-inferior extent holds a slice.

    Each slice's brain is resized to span `fill` of the width (the cross-section's size would otherwise tell
    the level) and shown in `views` seeded random views (scale, rotation, shift, gamma; every split alike), so
    its size, place and contrast in the picture do not give the level away: its shape and anatomy must. With
    one template brain, neighbouring slices look alike: the default gap of 4 slices (mm) between slabs keeps
    test slices at least 5 mm from any training slice. The shape of the cross-section still carries the
    level (that is anatomy): simple shape and intensity features are far above chance.

    Args:
        img_size: square output size.
        levels: classes, from the vertex (level 1) down to the skull base.
        slab, gap, step: split by slabs of consecutive slices as in `brain_tissue`.
        min_brain: keep slices where GM + WM cover at least this fraction of the slice.
        fill: share of the width the brain's bounding box spans before the random scale.
        scale, shift, rotate, gamma: ranges of the seeded views (shift in half-widths, rotation in degrees).
        views: views per slice (all in the slice's split; a label budget counts views); seed: seed of the views.
    """
    if slab < 1 or gap < 0 or step < 1 or levels < 2 or views < 1:
        raise ValueError(f"slab >= 1, gap >= 0, step >= 1, levels >= 2, views >= 1 required; got {slab}, {gap}, "
                         f"{step}, {levels}, {views}")
    kept, _, _ = _mni_slices(min_brain)
    first, rng = kept[0].index, np.random.default_rng(seed)
    images, labels, splits, groups = [], [], [], []
    for rank, s in enumerate(kept):
        base = resize_square(s.pixels, img_size, fit="pad")
        seen = [view(base, rng.uniform(*scale), rng.uniform(-rotate, rotate), tuple(rng.uniform(-shift, shift, 2)),
                     rng.uniform(*gamma), fill) for _ in range(views)]  # drawn for every slice: seeds stay put
        block, use = _slab(s.index - first, slab, gap, step)
        if not use:
            continue
        for image in seen:
            images.append(image.astype(np.float32))
            labels.append(rank * levels // len(kept))  # kept slices run S -> I
            splits.append(PATTERN[block % len(PATTERN)])
            groups.append(f"slab{block}")
    out, grp = _split(images, labels, splits, groups)
    names = [f"level {i + 1}" + (" (vertex)" if i == 0 else " (skull base)" if i == levels - 1 else "")
             for i in range(levels)]
    return TaskData("brain_level", "classification", "MNI152 T1 (nilearn), seeded views", levels, names, out, grp,
                    {"slab": slab, "gap": gap, "step": step, "plane": "axial", "slices": len(kept),
                     "view": {"fill": fill, "scale": list(scale), "shift": shift, "rotate": rotate,
                              "gamma": list(gamma), "views": views, "seed": seed}}, test_files=subject_files())
