"""A backbone entry holding a SparK-pretrained ResNet-18 becomes a pretrained-CNN row trained exactly as the
from-scratch CNN row: the same "scratch" hyper-parameters and learning-rate grid, the same seeded classifier."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import run_all
from benchmarks.cells import Backbone, _build
from medssl.data.holdout import write_pool_record
from medssl.hub import save_backbone
from medssl.models.spark import create_spark

torch.set_num_threads(1)

MICRO_HP = {"epochs": 1, "min_steps": 2, "batch_size": 8, "lr": 1e-3, "evals": 1}


@pytest.fixture(scope="module")
def spark_bb(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_cnn")
    (tmp / "pool").mkdir()
    (tmp / "pool" / "manifest.jsonl").write_text("")
    write_pool_record(tmp / "pool")  # pretrained on nothing: disjoint from every test set
    torch.manual_seed(0)
    spark = create_spark("spark_resnet18", img_size=32, in_chans=1, mask_patch=8, decoder_dim=16)
    spark(torch.rand(4, 1, 32, 32))  # one pass: BN statistics off their initial values
    save_backbone(spark, tmp / "spark", data=str(tmp / "pool"), mask_ratio=0.6)
    return tmp, spark


def test_pretrained_cnn_row_is_trained_like_the_scratch_cnn(spark_bb):
    tmp, spark = spark_bb
    cfg = {"name": "micro_cnn", "img_size": 32, "threads": 1, "device": "cpu",
           "backbones": [{"source": str(tmp / "spark"), "data": "toy"}],
           "tasks": [{"name": "image_qc", "planes": 1}], "protocols": ["finetune"], "label_fractions": [5],
           "seeds": [0], "finetune": {**MICRO_HP, "lr_grid": [1e-3, 1e-4]},
           "scratch": {**MICRO_HP, "lr_grid": [1e-3, 3e-3]}}
    (tmp / "micro.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp / "results"
    assert run_all.main(["--config", str(tmp / "micro.yaml"), "--out", str(out)]) == 0
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(cells) == 2  # the CNN from scratch and the SparK ResNet-18: a CNN has no random-init ViT twin
    assert all(sorted(c["val_by_lr"]) == ["0.001", "0.003"] for c in cells)  # both searched the scratch grid
    agg = json.loads((out / "results.json").read_text())["aggregated"]
    rows = {(a["role"], a["pretraining"], a["backbone"], a["protocol"]) for a in agg}
    assert rows == {("cnn", "none (from scratch)", "ResNet-18", "scratch"), ("pretrained", "SparK", "ResNet-18",
                                                                              "finetune")}
    spark_row = next(a for a in agg if a["role"] == "pretrained")
    assert not spark_row["verdict"].startswith("n/a")  # its baseline is the CNN from scratch


def test_pretrained_cnn_cell_starts_from_the_folder_and_the_scratch_classifier(spark_bb):
    tmp, spark = spark_bb
    from benchmarks.tasks import build_task

    task = build_task({"name": "image_qc", "planes": 1}, 32)
    torch.manual_seed(0)
    scratch, _ = _build(task, Backbone("cnn", "resnet18", "none", "-", "ResNet-18"), "scratch", MICRO_HP, 32)
    torch.manual_seed(0)
    model, groups = _build(task, Backbone("cnn_pretrained", str(tmp / "spark"), "SparK", "toy", "ResNet-18"),
                           "finetune", MICRO_HP, 32)
    assert groups is None and type(model) is type(scratch)
    for k, v in spark.encoder_state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(model.fc.weight, scratch.fc.weight, rtol=0, atol=0)  # the same fresh classifier
    with pytest.raises(ValueError, match="finetune"):
        _build(task, Backbone("cnn_pretrained", str(tmp / "spark"), "SparK", "toy", "ResNet-18"), "probe",
               MICRO_HP, 32)


def test_pretrained_cnn_row_whose_pool_holds_a_test_image_is_refused(spark_bb, tmp_path):
    """The pool check covers CNN rows as the ViT rows: a SparK backbone pretrained on a pool listing one of the
    task's test files stops the run before any cell is computed."""
    from benchmarks.tasks import build_task
    from medssl.data.holdout import PoolOverlapError

    _, spark = spark_bb
    test_file = build_task({"name": "image_qc", "planes": 1}, 32).test_files[0]
    pool = tmp_path / "leaky_pool"
    pool.mkdir()
    (pool / "manifest.jsonl").write_text(json.dumps({"input": str(test_file), "status": "written"}) + "\n")
    write_pool_record(pool)
    save_backbone(spark, tmp_path / "leaky", data=str(pool), mask_ratio=0.6)
    cfg = {"name": "micro_cnn_leak", "img_size": 32, "threads": 1, "device": "cpu",
           "backbones": [{"source": str(tmp_path / "leaky"), "data": "toy"}],
           "tasks": [{"name": "image_qc", "planes": 1}], "protocols": ["finetune"], "label_fractions": [5],
           "seeds": [0], "finetune": MICRO_HP, "scratch": MICRO_HP}
    (tmp_path / "leak.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "results"
    rows = run_all.resolve_backbones(cfg)
    assert [(b.kind, b.pool) for b in rows] == [("cnn_pretrained", str(pool))]  # a CNN row, its pool found
    with pytest.raises(PoolOverlapError, match=Path(test_file).name):
        run_all.main(["--config", str(tmp_path / "leak.yaml"), "--out", str(out)])
    assert not list(out.glob("cells/*.json"))  # refused before any cell
