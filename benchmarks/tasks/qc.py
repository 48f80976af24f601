"""Image quality control: is a slice clean, or does it carry motion ghosting / noise / bias / rings?

Source images are the real medical images that installed packages ship: pydicom's test files and
pydicom-data (CT, MR, CR/DX/RG, US, NM, ...; secondary-capture test patterns, modality OT, are
left out), nibabel's test volumes and nilearn's MNI152 T1. Every volume or multi-frame file gives
up to `planes` evenly spaced planes; each plane appears once per class (clean and each artifact,
seeded), so a model must find the artifact, not recognise the picture. Files encoding the same
image (same SOP instance) are read once; the split is by source series / volume.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from benchmarks.tasks import TaskData
from benchmarks.tasks.artifacts import ARTIFACTS, VERSION, apply_artifact
from medssl.data.datasets import split_by_group
from medssl.data.imaging import Window, iter_slices, normalise, read_image, resize_square

SKIP_MODALITIES = {"OT", "SC", "SEG", "RTDOSE", "SR"}
MIN_SIDE = 48


def source_files() -> list[Path]:
    """Real image files shipped by pydicom (+ pydicom-data), nibabel and nilearn."""
    import nibabel
    import nilearn
    import pydicom.data

    files = [Path(p) for p in pydicom.data.get_testdata_files()]
    nib_dir = Path(nibabel.__file__).parent / "tests" / "data"
    files += sorted(p for p in nib_dir.glob("*") if p.name.endswith((".nii", ".nii.gz", ".dcm")))
    files.append(Path(nilearn.__file__).parent / "datasets" / "data" /
                 "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    return sorted(set(files))


def _planes(path: Path, img_size: int, planes: int) -> tuple[list[np.ndarray], str, str, str] | None:
    """Square planes of one file, its group (series / file), modality and identity; None if unusable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = read_image(path)
        except Exception:  # noqa: BLE001 - test files include deliberately broken ones
            return None
    if img.modality in SKIP_MODALITIES or min(img.pixels.shape[-2:]) < MIN_SIDE:
        return None
    px, _ = normalise(img, Window("soft", -160.0, 240.0) if img.modality == "CT" else None)
    if px.ndim == 2:
        out = [px]
    elif img.is_volume:
        sl = list(iter_slices(px, img.spacing, axis=0, min_foreground=0.1))
        out = [s.pixels for s in sl[:: max(1, len(sl) // planes)]][:planes]
    else:  # frames
        out = [px[i] for i in np.linspace(0, px.shape[0] - 1, min(planes, px.shape[0])).astype(int)]
    out = [resize_square(p, img_size, fit="pad") for p in out if float(p.max()) > float(p.min())]
    group = str(img.uids.get("series") or path.name)
    ident = str(img.uids.get("instance") or path.name)
    return (out, group, img.modality, ident) if out else None


def image_qc(img_size: int = 64, planes: int = 12, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
             split_seed: int = 0, artifacts: tuple[str, ...] = ARTIFACTS) -> TaskData:
    """Build the task.

    Args:
        img_size: square output size.
        planes: at most this many planes per volume / multi-frame file.
        fractions: train / val / test share of the samples, dealt out by source series.
        split_seed: seed of the group split.
        artifacts: class list; must start with "clean".
    """
    if not artifacts or artifacts[0] != "clean" or len(artifacts) < 2:
        raise ValueError(f"artifacts must start with 'clean' and have >= 2 entries, got {artifacts}")
    images, labels, groups, seen, modalities = [], [], [], set(), {}
    files_of: dict[str, list[str]] = {}  # source group -> its files
    for path in source_files():
        got = _planes(path, img_size, planes)
        if got is None:
            continue
        out, group, modality, ident = got
        if ident in seen:  # the same SOP instance in another transfer syntax
            continue
        seen.add(ident)
        files_of.setdefault(group, []).append(str(path))
        modalities[modality] = modalities.get(modality, 0) + len(out)
        for j, base in enumerate(out):
            for c, name in enumerate(artifacts):
                seed = zlib.crc32(f"{path.name}:{j}:{name}".encode())
                images.append(apply_artifact(base, name, seed))
                labels.append(c)
                groups.append(group)
    if not images:
        raise ValueError("image_qc: no usable image found in pydicom / nibabel / nilearn")
    split = np.array(split_by_group(groups, fractions, seed=split_seed))
    x = torch.from_numpy(np.stack(images)).float()[:, None]  # [N, 1, S, S]
    y = torch.tensor(labels)
    out_splits = {k: (x[torch.from_numpy(split == k)], y[torch.from_numpy(split == k)])
                  for k in ("train", "val", "test")}
    grp = {k: [g for g, s in zip(groups, split) if s == k] for k in out_splits}
    return TaskData("image_qc", "classification", "pydicom/nibabel/nilearn slices + seeded artifacts",
                    len(artifacts), list(artifacts), out_splits, grp,
                    {"planes_per_modality": modalities, "source_groups": len(set(groups)), "version": VERSION},
                    test_files=sorted({f for g in set(grp["test"]) for f in files_of[g]}))
