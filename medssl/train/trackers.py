"""Experiment trackers beside `metrics.csv`: MLflow (a local file store by default) and W&B (offline).

Chosen by name (`output.loggers: [mlflow, wandb]` in a run config, `TrainConfig.loggers` in the engine); each is
imported lazily, and a missing package costs one warning line, never the run. A tracker gets the run's
`config.yaml` (flattened) as parameters, then every logged row of scalars, and keeps its run id in the run
folder so that a resumed run continues the same tracker run.

- MLflow: `MlflowClient` on `<run>/mlruns` (MLflow >= 3 keeps its file store in maintenance mode and asks for
  `MLFLOW_ALLOW_FILE_STORE=true`, which is set here for a `file:` store only); another store through
  `MEDSSL_MLFLOW_URI` (e.g. `sqlite:///mlflow.db` or a server).
- W&B: `wandb.init(mode="offline", dir=<run>)`; `wandb sync <run>/wandb/offline-run-*` uploads it later.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = ["TRACKERS", "Tracker", "flatten", "make_trackers"]

TRACKERS = ("mlflow", "wandb")
IDS_FILE = "trackers.json"
log = logging.getLogger("medssl")


class Tracker(Protocol):
    """What the engine's logger calls."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other leaves kept as they are."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _ids(folder: Path) -> dict[str, str]:
    f = folder / IDS_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _save_id(folder: Path, name: str, run_id: str) -> None:
    ids = {**_ids(folder), name: run_id}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / IDS_FILE).write_text(json.dumps(ids, indent=1))


class MLflowTracker:
    """One MLflow run per medssl run (resumed runs continue it)."""

    def __init__(self, folder: Path, run_name: str, params: dict[str, Any], uri: str | None = None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = uri or os.environ.get("MEDSSL_MLFLOW_URI") or (folder / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client, self.uri = MlflowClient(tracking_uri=uri), uri
        run_id = _ids(folder).get("mlflow")
        if run_id is None:
            exp = self.client.get_experiment_by_name("medssl")
            exp_id = exp.experiment_id if exp else self.client.create_experiment("medssl")
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            _save_id(folder, "mlflow", run_id)
            items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=items[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A W&B run in offline mode, written under the run folder."""

    def __init__(self, folder: Path, run_name: str, params: dict[str, Any]) -> None:
        import wandb

        run_id = _ids(folder).get("wandb")
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="medssl", name=run_name, dir=str(folder), mode="offline", config=params,
                              id=run_id, resume="allow" if run_id else None, reinit="create_new")
        if run_id is None:
            _save_id(folder, "wandb", self.run.id)
        self.dir = Path(self.run.dir).parent  # <run>/wandb/offline-run-<time>-<id>

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def make_trackers(names: Sequence[str], folder: str | os.PathLike, run_name: str | None = None,
                  params: dict[str, Any] | None = None) -> list[Tracker]:
    """Trackers for `names` (subset of `TRACKERS`), writing under `folder`; unknown names raise ValueError, a
    missing package logs one warning and is skipped."""
    bad = sorted(set(names) - set(TRACKERS))
    if bad:
        raise ValueError(f"unknown loggers {bad}; known: {list(TRACKERS)} (metrics.csv is always written)")
    folder = Path(folder)
    if params is None:
        cfg = folder / "config.yaml"
        if cfg.is_file():
            import yaml

            params = yaml.safe_load(cfg.read_text()) or {}
    run_name = run_name or folder.resolve().name
    out: list[Tracker] = []
    for name in dict.fromkeys(names):
        try:
            out.append(MLflowTracker(folder, run_name, params or {}) if name == "mlflow" else
                       WandbTracker(folder, run_name, params or {}))
        except ImportError as err:
            log.warning("logger %r skipped: %s (pip install 'medssl[tracking]')", name, err)
        except Exception as err:  # noqa: BLE001 - an unreachable store must not cost the training run
            log.warning("logger %r skipped: %s: %s", name, type(err).__name__, err)
    return out
