"""Brain tissue segmentation on axial slices of nilearn's MNI152 (2009a) T1 template.

Labels come from the template's own grey- and white-matter probability maps: each pixel takes the
most probable of background (1 - GM - WM), GM and WM after resizing. The three volumes share one
grid, are read with `medssl.data.imaging.read_nifti` (slices in its S->I order) and are cropped to
the brain's bounding box (one box for all slices).

Splits are by slab: consecutive slices form slabs of `slab` slices, a `gap` of slices between slabs
is dropped so that no two neighbouring slices sit in different splits, and slabs are dealt out
cyclically train, val, train, test, so every split spans the brain from bottom to top.
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
    f = mni_files()
    t1 = read_nifti(f["t1"], "MR")
    gm = read_nifti(f["gm"], "MR").pixels
    wm = read_nifti(f["wm"], "MR").pixels
    t1_01, _ = normalise(t1)  # [Z, Y, X] in [0, 1]
    # crop Y and X to the brain's bounding box over the whole volume (+ margin): same box for every slice
    brain = (gm + wm) > 0.1  # [Z, Y, X]
    ys, xs = np.flatnonzero(brain.any(axis=(0, 2))), np.flatnonzero(brain.any(axis=(0, 1)))
    y0, y1 = max(0, ys[0] - 4), min(brain.shape[1], ys[-1] + 5)
    x0, x1 = max(0, xs[0] - 4), min(brain.shape[2], xs[-1] + 5)
    t1_01, gm, wm = (v[:, y0:y1, x0:x1] for v in (t1_01, gm, wm))
    kept = []
    for s in iter_slices(t1_01, t1.spacing, axis=0):
        g, w = gm[s.index], wm[s.index]  # [Y, X]
        if float(((g + w) > 0.5).mean()) >= min_brain:
            kept.append(s)
    if not kept:
        raise ValueError("brain_tissue: no slice has enough brain; lower min_brain")
    first = kept[0].index
    images, masks, splits, groups = [], [], [], []
    for s in kept:
        r = s.index - first
        block, within = divmod(r, slab + gap)
        if within >= slab or within % step:
            continue
        g, w = gm[s.index], wm[s.index]
        probs = [np.clip(1.0 - g - w, 0.0, 1.0), g, w]
        probs = np.stack([resize_square(p.astype(np.float32), img_size, fit="pad") for p in probs])
        images.append(resize_square(s.pixels, img_size, fit="pad"))
        masks.append(probs.argmax(0))
        splits.append(PATTERN[block % len(PATTERN)])
        groups.append(f"slab{block}")
    x = torch.from_numpy(np.stack(images)).float()[:, None]  # [N, 1, S, S]
    y = torch.from_numpy(np.stack(masks)).long()  # [N, S, S]
    sp = np.array(splits)
    out = {k: (x[torch.from_numpy(sp == k)], y[torch.from_numpy(sp == k)]) for k in ("train", "val", "test")}
    grp = {k: [g for g, s in zip(groups, splits) if s == k] for k in out}
    return TaskData("brain_tissue", "segmentation", "MNI152 T1 (nilearn)", 3, CLASSES, out, grp,
                    {"slab": slab, "gap": gap, "step": step, "plane": "axial"})
