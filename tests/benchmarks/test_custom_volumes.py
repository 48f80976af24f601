"""The no-code 3-D task: `image,mask[,patient]` NIfTI pairs in YAML, split by patient, crops and tiles; and
run_all on it beside a 2-D backbone: the volume task gets the 3-D rows only (pretrained UNETR, its random-init
twin, the 3-D U-Net), fine-tuned; the 2-D rows are left out of its table."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from benchmarks import run_all
from benchmarks.tasks import build_task
from medssl.data.holdout import write_pool_record
from medssl.hub import save_backbone
from medssl.models.mae import create_mae
from medssl.models.vit import build_vit

torch.set_num_threads(1)


def _pairs(tmp, n: int = 4, label: int = 1) -> str:
    lines = ["image,mask,patient"]
    for i in range(n):
        vol = np.full((12, 10, 6), 100.0 * (i + 1), np.float32)  # 2 x 2 x 4 mm, RAS
        seg = np.zeros(vol.shape, np.uint8)
        seg[3:6, 2:5, 1:3] = label
        affine = np.diag([2.0, 2.0, 4.0, 1.0])
        nib.save(nib.Nifti1Image(vol, affine), str(tmp / f"v{i}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(tmp / f"m{i}.nii.gz"))
        lines.append(f"v{i}.nii.gz,m{i}.nii.gz,p{min(i, 2)}")  # v2 and v3: one patient
    (tmp / "pairs.csv").write_text("\n".join(lines) + "\n")
    return str(tmp / "pairs.csv")


def test_volume_pairs_become_a_3d_task_split_by_patient(tmp_path):
    spec = {"name": "mine", "kind": "segmentation", "dims": 3, "csv": _pairs(tmp_path), "num_classes": 2,
            "spacing": 2.0, "window": [0, 1000], "train_crops": 3}
    task = build_task(spec, 8)
    assert task.spatial_dims == 3 and task.summary()["spatial_dims"] == 3
    for patients in task.groups.values():
        assert patients and len(set(patients)) == 1  # three patients, one per split
    for split, (x, y) in task.splits.items():
        per = 3 if split == "train" else 8  # 12 x 10 x 12 voxels at 2 mm: tiles of 8^3 -> 2 x 2 x 2
        assert x.shape[1:] == (1, 8, 8, 8) and y.shape[1:] == (8, 8, 8) and x.shape[0] % per == 0
    volumes = len(task.groups["test"]) // 8  # 8 tiles per test volume
    assert int(task.splits["test"][1].sum()) == volumes * 3 * 3 * 2 * 2  # each label voxel once (z: 4 -> 2 mm)
    test_patient = task.groups["test"][0]
    want = {"p0": ["v0"], "p1": ["v1"], "p2": ["v2", "v3"]}[test_patient]
    assert task.test_files == [str(tmp_path / f"{v}.nii.gz") for v in want]
    assert float(task.splits["train"][0].max()) <= 1.0
    with pytest.raises(ValueError, match="outside 0..1"):
        build_task({**spec, "csv": _pairs(tmp_path, label=2)}, 8)
    with pytest.raises(ValueError, match="dims: 3 takes kind segmentation"):
        build_task({**spec, "kind": "classification"}, 8)


HP = {"epochs": 2, "batch_size": 2, "lr_grid": [1e-3, 3e-3], "evals": 1, "unetr_feature_size": 4, "unet_base": 4,
      "unet_levels": 2}


def test_run_all_gives_a_volume_task_its_3d_rows_only(tmp_path, capsys):
    pytest.importorskip("monai")
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "manifest.jsonl").write_text("")
    write_pool_record(tmp_path / "pool")  # pretrained on nothing: disjoint from every test set
    torch.manual_seed(0)
    mae = create_mae("mae_vit_tiny_patch16", img_size=16, spatial_dims=3, cls_token=False, embed_dim=24,
                     decoder_depth=1, decoder_embed_dim=16, decoder_num_heads=2)
    save_backbone(mae, tmp_path / "bb3", data=str(tmp_path / "pool"))
    save_backbone(build_vit(24, 2, 3, 8, 16, 1), tmp_path / "bb2", data=str(tmp_path / "pool"))
    task = {"name": "vols", "kind": "segmentation", "dims": 3, "csv": _pairs(tmp_path), "num_classes": 2,
            "window": [0, 1000], "train_crops": 2}
    cfg = {"name": "vol", "img_size": 16, "threads": 1, "device": "cpu", "tasks": [task],
           "backbones": [{"source": str(tmp_path / "bb3"), "pretraining": "MAE", "data": "toy"},
                         {"source": str(tmp_path / "bb2"), "pretraining": "MAE 2-D", "data": "toy"}],
           "protocols": ["probe", "finetune"], "label_fractions": [1.0], "seeds": [0],
           "probe": HP, "finetune": HP, "scratch": HP}
    (tmp_path / "vol.yaml").write_text(yaml.safe_dump(cfg))
    assert run_all.main(["--config", str(tmp_path / "vol.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert "vols: 3-D task; rows of other dimensions left out: ViT-24/8 (MAE 2-D)" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert sorted((r["pretraining"], r["protocol"]) for r in rows) == [
        ("MAE", "finetune"), ("none (from scratch)", "scratch"), ("none (random init)", "finetune")]
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
