"""The one engine under every task: seekable rank-sharded epochs, DDP equivalence, hooks, best, resume."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from medssl.data.epochs import EpochBatches, PairedBatches
from medssl.train.dist import DistInfo
from medssl.train.engine import Engine, TrainConfig
from medssl.train.task import Task

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


class _Noisy(Dataset):
    """Item i is (i, a random draw): the draw shows whether augmentation randomness is per-sample seeded."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor(i), torch.rand(())


def _flat(batches):
    return [(int(i), float(r)) for b in batches for i, r in zip(*b)]


def test_epochs_are_seekable_rank_sharded_and_worker_independent():
    full = EpochBatches(_Noisy(), 3, seed=5)
    epoch2 = list(full.batches(2))
    assert len(full) == 4 and len(epoch2) == 4
    assert sorted(i for i, _ in _flat(epoch2)) == list(range(10))  # a permutation of the data
    assert _flat(full.batches(2, start=2)) == _flat(epoch2[2:])  # seeking skips, reads nothing before
    assert _flat(list(full.batches(2))) == _flat(epoch2)  # a pure function of (seed, epoch)
    assert _flat(full.batches(3)) != _flat(epoch2)
    assert _flat(EpochBatches(_Noisy(), 3, seed=5, workers=2).batches(2)) == _flat(epoch2)  # workers change nothing
    shards = [EpochBatches(_Noisy(), 3, seed=5, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]  # ceil(10 / 2) = 5 samples per rank
    got = sorted(i for s in shards for i, _ in _flat(s.batches(2)))
    assert got == list(range(10))  # the ranks split the epoch: disjoint shares covering every sample


def test_paired_batches_cycle_the_second_set_and_seek():
    first, second = EpochBatches(_Noisy(), 2, seed=1), EpochBatches(TensorDataset(torch.arange(3) + 100), 2, seed=2)
    pairs = list(PairedBatches(first, second).batches(0))
    assert len(pairs) == 5
    seconds = [int(v) for _, (s,) in pairs for v in s]
    assert sorted(seconds[:3]) == [100, 101, 102]  # the first cycle visits every target image once
    again = list(PairedBatches(first, second).batches(0, start=3))
    assert [[int(v) for v in s] for _, (s,) in again] == [[int(v) for v in s] for _, (s,) in pairs[3:]]


class _Recorder(Task):
    """A regression task that records its hooks and scores a fixed sequence (best = epoch 1)."""

    def __init__(self):
        super().__init__(torch.nn.Linear(4, 1))
        self.calls, self.scores = [], iter([0.2, 0.9, 0.5])

    def losses(self, model, batch):
        x, y = batch
        return {"loss": torch.nn.functional.mse_loss(model(x), y), "aux": torch.tensor(2.0)}

    def on_epoch_start(self, engine, epoch):
        self.calls.append(("epoch", epoch, engine.step))

    def after_step(self, engine):
        self.calls.append(("step", engine.step))

    def evaluate(self, engine, epoch):
        return {"score": next(self.scores)}

    def on_best(self, engine, epoch, metrics):
        self.calls.append(("best", epoch, metrics["score"]))


def test_engine_epochs_hooks_schedule_and_best(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = EpochBatches(TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)), 4, seed=0)
    task = _Recorder()
    cfg = TrainConfig(total_steps=6, lr=0.1, schedule="step", lr_drop_step=4, steps_per_epoch=2, precision="fp32",
                      select="score", log_every=1, ckpt_every=0, betas=(0.9, 0.999))
    lrs = [cfg.lr_at(s) for s in range(6)]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01])
    engine = Engine(task, cfg, tmp_path, DistInfo())
    engine.fit(data)
    assert [c for c in task.calls if c[0] == "epoch"] == [("epoch", 0, 0), ("epoch", 1, 2), ("epoch", 2, 4)]
    assert [c[1] for c in task.calls if c[0] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [c for c in task.calls if c[0] == "best"] == [("best", 0, 0.2), ("best", 1, 0.9)]
    assert engine.best["epoch"] == 1 and [h["val"]["score"] for h in engine.history] == [0.2, 0.9, 0.5]
    assert all(h["loss_aux"] == 2.0 for h in engine.history)  # every loss entry is logged per epoch
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-00000004.pt",
                                                                            "checkpoint-00000006.pt"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_failing_rank_reaches_the_launcher_while_its_peer_waits():
    """A rank that raises skips the exit barrier: torchrun sees the error and stops the waiting peer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_port()), str(ROOT / "tests/train/_ddp_fail.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr


@pytest.mark.slow
def test_ddp_step_equals_one_process_with_the_whole_batch(tmp_path):
    """2 processes x B/2 take the same optimizer step as 1 process x B (fp32, batch-independent model)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "tests" / "train" / "_ddp_step.py")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    for n, name in ((1, "one.pt"), (2, "two.pt")):
        cmd = [torchrun, "--nproc_per_node", str(n), "--master_port", str(_port()), script, str(tmp_path / name), "4"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    torch.manual_seed(1)
    init = torch.nn.Linear(5, 3).state_dict()  # the script's initial weights
    assert not torch.allclose(one["weight"], init["weight"])  # the step moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-6, atol=1e-7)


def test_prune_keeps_newest_and_snapshots(tmp_path):
    """The newest `keep` checkpoints stay, and so do those at multiples of `keep_every`; 0 keeps no snapshot."""
    from medssl.train.checkpoint import checkpoint_path, prune_checkpoints

    def make(steps):
        for s in steps:
            checkpoint_path(tmp_path, s).write_bytes(b"x")

    def left():
        return sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("checkpoint-*.pt"))

    make([26, 52, 520, 546, 1040, 1066, 1092])
    prune_checkpoints(tmp_path, keep=2, keep_every=520)
    assert left() == [520, 1040, 1066, 1092]
    prune_checkpoints(tmp_path, keep=2)
    assert left() == [1066, 1092]


@pytest.mark.parametrize("eval_precision, autocast", [("fp32", False), ("train", True)])
def test_evaluation_runs_in_float32_unless_asked(tmp_path, eval_precision, autocast):
    """The best epoch is chosen on the numbers the final scoring computes (float32), not on bf16 ones."""
    seen = []

    class Probe(_Recorder):
        def evaluate(self, engine, epoch):
            seen.append((torch.is_autocast_enabled("cpu"), self.model(torch.ones(1, 4)).dtype))
            return {"score": float(epoch)}

    g = torch.Generator().manual_seed(0)
    data = EpochBatches(TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)), 4, seed=0)
    cfg = TrainConfig(total_steps=2, lr=0.1, steps_per_epoch=2, precision="bf16", select="score", ckpt_every=0,
                      eval_precision=eval_precision)
    Engine(Probe(), cfg, tmp_path, DistInfo()).fit(data)
    assert seen == [(autocast, torch.bfloat16 if autocast else torch.float32)]
    with pytest.raises(ValueError, match="eval_precision"):
        TrainConfig(total_steps=2, lr=0.1, eval_precision="bf16")
