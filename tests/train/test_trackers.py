"""output.loggers: MLflow (local file store) and W&B (offline) runs, read back with each tracker's own client."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from medssl.config import load_config
from medssl.pretrain import DEFAULTS, run
from medssl.train.dist import DistInfo
from medssl.train.engine import TrainConfig
from medssl.train.trackers import IDS_FILE
from tests.train.conftest import TINY


def _cfg(shards, out, *extra):
    return load_config(DEFAULTS, None, [*TINY, f"data.shards={shards}", f"output.dir={out}", "train.epochs=1",
                                        "train.warmup_epochs=0", *extra])


def _csv(out: Path) -> dict[int, float]:
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_unknown_logger_is_an_error():
    with pytest.raises(ValueError, match="unknown loggers"):
        TrainConfig(total_steps=1, lr=1e-3, loggers=("neptune",))


def test_mlflow_run_read_back_and_resumed(toy_shards, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "run"
    run(_cfg(toy_shards, out, "output.loggers=[mlflow]", "train.stop_at=5"), DistInfo())
    run(_cfg(toy_shards, out, "output.loggers=[mlflow]"), DistInfo(), resume=True)
    run_id = json.loads((out / IDS_FILE).read_text())["mlflow"]
    client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    got = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert got == pytest.approx(_csv(out)) and sorted(got) == list(range(1, 13))  # one run across the resume
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.params["model.name"] == "mae_vit_tiny_patch8"
    assert r.data.params["train.epochs"] == "1" and {"lr", "images_per_s"} <= set(r.data.metrics)
    assert len(client.search_runs([r.info.experiment_id])) == 1


def _wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`), parsed with wandb's own protobuf classes.

    Framing (LevelDB log style, as W&B writes it): a 7-byte ':W&B' header, then 32 KiB blocks of records,
    each a 7-byte header (checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) and data.
    """
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(raw):
        room = block - pos % block
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunks += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            yield rec


def test_wandb_offline_run_read_back(toy_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "run"
    run(_cfg(toy_shards, out, "output.loggers=[wandb]"), DistInfo())
    (log,) = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    history, config = {}, {}
    for rec in _wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[int(row["_step"])] = row
        elif kind in ("run", "config"):  # the run record carries the config given to wandb.init
            updates = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates})
    assert {s: h["loss"] for s, h in history.items()} == pytest.approx(_csv(out))
    assert config["model"]["name"] == "mae_vit_tiny_patch8" and config["train"]["epochs"] == 1


def test_a_failing_tracker_is_dropped_not_fatal(tmp_path, caplog):
    from medssl.train.logging import ScalarLogger

    class Broken:
        def log_metrics(self, step, metrics):
            raise ConnectionError("store unreachable")

        def close(self):
            raise ConnectionError("store unreachable")

    logger = ScalarLogger(tmp_path)
    logger._trackers.append(Broken())
    logger.log(1, loss=0.5)  # the CSV row is written; the tracker's failure is logged and it is dropped
    logger.log(2, loss=0.4)
    logger.close()
    assert "dropped at step 1" in caplog.text and logger._trackers == []
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3
