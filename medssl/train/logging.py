"""Run logging: a CSV of scalars per logged step, TensorBoard when installed, MLflow / W&B when asked for
(`medssl.train.trackers`), a tqdm progress bar."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("medssl")


def setup_logging(level: int = logging.INFO) -> None:
    """Plain `HH:MM:SS medssl: message` lines on stderr (once)."""
    logger = logging.getLogger("medssl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)


class ScalarLogger:
    """Appends rows to `metrics.csv` (resumes an existing file) and mirrors them to TensorBoard if present and
    to the trackers named in `trackers` ("mlflow", "wandb")."""

    def __init__(self, folder: str | os.PathLike, enabled: bool = True, resume_step: int = 0,
                 trackers: Sequence[str] = ()):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.csv"
        self._fields: list[str] | None = None
        self._tb = None
        self._trackers: list[Any] = []
        if not enabled:
            return
        if self.path.exists():  # keep rows up to the resume point: a resumed run continues the same file
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r.get("step", 0)) <= resume_step]
            if rows:
                self._fields = list(rows[0])
                self._write(rows, mode="w")
            else:
                self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(folder) / "tensorboard"))
        except Exception:  # tensorboard not installed
            self._tb = None
        if trackers:
            from medssl.train.trackers import make_trackers

            self._trackers = make_trackers(trackers, folder)

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open(mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if mode == "w":
                w.writeheader()
            w.writerows(rows)

    def log(self, step: int, **scalars: float) -> None:
        """Record one row of scalars at `step`."""
        if not self.enabled:
            return
        row = {"step": step, **scalars}
        if self._fields is None:
            self._fields = list(row)
            self._write([row], mode="w")
        else:
            self._write([row], mode="a")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        self.track(step, **scalars)

    def track(self, step: int, **scalars: float) -> None:
        """Send scalars to the trackers only (e.g. validation metrics, which have no CSV column)."""
        if self.enabled:
            for t in list(self._trackers):
                try:
                    t.log_metrics(step, {k: float(v) for k, v in scalars.items()})
                except Exception as err:  # noqa: BLE001 - a tracker never costs the run: warn once, drop it
                    log.warning("logger %s dropped at step %d: %s: %s", type(t).__name__, step,
                                type(err).__name__, err)
                    self._trackers.remove(t)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for t in self._trackers:
            try:
                t.close()
            except Exception as err:  # noqa: BLE001 - as in track
                log.warning("logger %s did not close cleanly: %s: %s", type(t).__name__, type(err).__name__, err)
