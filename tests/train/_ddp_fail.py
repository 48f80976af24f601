"""Run by tests/train/test_one_engine.py under torchrun with 2 ranks: rank 1 raises inside `launched` while
rank 0 waits in a collective that rank 1 never joins; the error must reach the launcher (no hang)."""

import argparse

import torch
import torch.distributed as torch_dist

from medssl.train.launch import launched


def main() -> None:
    args = argparse.Namespace(deepspeed=False, deepspeed_config=None)
    with launched(args, "cpu") as (dist, _):
        if dist.rank == 1:
            raise ValueError("rank 1 fails on purpose")
        torch_dist.all_reduce(torch.ones(1))


if __name__ == "__main__":
    main()
