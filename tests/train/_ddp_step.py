"""Run by tests/train/test_one_engine.py: one optimizer step of a linear regression task on the engine,
under whatever launcher started this script; rank 0 saves the resulting weights to argv[1]."""

import sys

import torch
from torch.utils.data import TensorDataset

from medssl.data.epochs import EpochBatches
from medssl.train.dist import cleanup_distributed, setup_distributed
from medssl.train.engine import Engine, TrainConfig
from medssl.train.task import Task


class Regression(Task):
    def losses(self, model, batch):
        x, y = batch
        return {"loss": torch.nn.functional.mse_loss(model(x), y)}


def train(out: str, global_batch: int, dist) -> None:
    """One step; rank 0 writes the weights. The engine goes out of scope on return, before the group is destroyed."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g))
    torch.manual_seed(1)
    task = Regression(torch.nn.Linear(5, 3))
    batches = EpochBatches(data, global_batch // dist.world_size, seed=3, rank=dist.rank, world_size=dist.world_size)
    cfg = TrainConfig(total_steps=1, lr=0.1, precision="fp32", weight_decay=0.0, log_every=1, ckpt_every=0)
    engine = Engine(task, cfg, None, dist)
    engine.fit(batches)
    if dist.is_main:
        torch.save(task.model.state_dict(), out)


def main(out: str, global_batch: int) -> None:
    dist = setup_distributed(device="cpu")
    train(out, global_batch, dist)
    cleanup_distributed(dist)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
