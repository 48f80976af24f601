"""Seekable, rank-sharded epochs over map-style datasets: what makes resume exact and cheap.

The order of epoch `e` is a pure function of `(seed, e)`; each rank takes every `world_size`-th index of it
(padded by repeating the start so that ranks get equal shares, as `DistributedSampler` does); every sample
draws its augmentation from a generator seeded by `(seed, e, index)`, so the batches do not depend on the
number of DataLoader workers. Resuming at micro-batch `j` of epoch `e` slices the index list: nothing before
it is read or decoded.

`EpochBatches` is one dataset; `PairedBatches` adds a second (e.g. unlabelled target images) cycled alongside
the first, its cycle `c` ordered by `(seed, e, c)`, so its position is a function of the step as well.
`ordered_batches` is one pass in dataset order, for evaluation and feature extraction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medssl.utils import seed_everything, stable_seed

__all__ = ["EpochBatches", "PairedBatches", "epoch_order", "ordered_batches"]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True, weights: Sequence[float] | None = None,
                num_samples: int | None = None) -> list[int]:
    """Indices of one epoch: a permutation (or draws with replacement by `weights`), fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(stable_seed(seed, epoch))
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.double)
        return torch.multinomial(w, num_samples or n, replacement=True, generator=g).tolist()
    return torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))


def ordered_batches(ds: Dataset, batch_size: int) -> Iterator[Any]:
    """The dataset's batches in order, once: in-memory tensors are sliced directly (a per-sample collate dominates
    small CPU runs), any other dataset goes through a DataLoader."""
    if isinstance(ds, TensorDataset):
        for i in range(0, len(ds), batch_size):
            yield tuple(t[i:i + batch_size] for t in ds.tensors)
        return
    yield from DataLoader(ds, batch_size=batch_size)


class _Seeded(Dataset):
    """Fetches `(seed_key, index)` keys: seeds python, NumPy and torch from the key, then reads the item."""

    def __init__(self, ds: Dataset, seed: int) -> None:
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        epoch, cycle, i = key
        seed_everything(stable_seed(self.seed, epoch, cycle, i))
        return self.ds[i]


class EpochBatches:
    """Micro-batches of one rank's share of each epoch.

    Args:
        ds: map-style dataset.
        batch_size: samples per micro-batch on this rank.
        seed: fixes orders and augmentations.
        rank, world_size: this rank's share.
        shuffle: permute each epoch (else dataset order).
        drop_last: drop a last, smaller micro-batch.
        collate: DataLoader collate function.
        workers: DataLoader workers.
        weights, num_samples: draw with replacement by these weights (a balanced sampler), `num_samples` a time.
    """

    def __init__(self, ds: Dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = False, collate: Callable | None = None, workers: int = 0,
                 weights: Sequence[float] | None = None, num_samples: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(ds) == 0:
            raise ValueError("the dataset is empty")
        self.ds, self.bs, self.seed = ds, batch_size, seed
        self.rank, self.world = rank, world_size
        self.shuffle, self.drop_last, self.collate, self.workers = shuffle, drop_last, collate, workers
        self.weights, self.num_samples = weights, num_samples
        self.per_rank = math.ceil((num_samples or len(ds)) / world_size)

    def __len__(self) -> int:
        """Micro-batches per epoch on each rank."""
        n = self.per_rank // self.bs if self.drop_last else math.ceil(self.per_rank / self.bs)
        return max(1, n)

    def rank_indices(self, epoch: int, cycle: int = 0) -> list[int]:
        """This rank's indices of an epoch (cycle > 0: a later pass within the same epoch)."""
        order = epoch_order(len(self.ds), stable_seed(self.seed, cycle), epoch, self.shuffle, self.weights,
                            self.num_samples)
        total = self.per_rank * self.world
        order = (order * math.ceil(total / len(order)))[:total]  # pad so every rank has the same share
        return order[self.rank::self.world]

    def _loader(self, batches: list[list[tuple[int, int, int]]]) -> DataLoader:
        return DataLoader(_Seeded(self.ds, self.seed), batch_sampler=batches, collate_fn=self.collate,
                          num_workers=self.workers if len(batches) > 1 else 0)

    def keyed_batches(self, epoch: int, cycle: int = 0) -> list[list[tuple[int, int, int]]]:
        """The epoch's micro-batches as lists of `(epoch, cycle, index)` keys."""
        idx = self.rank_indices(epoch, cycle)
        out = [[(epoch, cycle, i) for i in idx[b * self.bs:(b + 1) * self.bs]] for b in range(len(self))]
        return [b for b in out if b]

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Micro-batches of `epoch` from micro-batch `start` on (earlier ones are skipped without reading)."""
        keyed = self.keyed_batches(epoch)[start:]
        if isinstance(self.ds, TensorDataset) and self.workers == 0 and self.collate is None:
            # in-memory tensors: index them directly (a per-sample collate dominates small CPU runs; no
            # per-sample randomness to seed)
            return (tuple(t[torch.as_tensor([k[2] for k in b])] for t in self.ds.tensors) for b in keyed)
        return iter(self._loader(keyed)) if keyed else iter(())


class PairedBatches:
    """`(primary, secondary)` micro-batch pairs: the primary's epoch, the secondary cycled alongside it.

    Within epoch `e`, micro-batch `j` pairs the primary's `j`-th with the secondary's `j mod len`-th of cycle
    `j // len` (its order fixed by (seed, e, cycle)), as a loop that restarts the secondary each epoch and
    re-shuffles it when exhausted would; resuming at any `j` reads nothing before it.
    """

    def __init__(self, primary: EpochBatches, secondary: EpochBatches) -> None:
        self.primary, self.secondary = primary, secondary

    def __len__(self) -> int:
        return len(self.primary)

    def _secondary(self, epoch: int, start: int) -> Iterator[Any]:
        n = len(self.secondary)
        cycle, offset = divmod(start, n)
        while True:
            keyed = self.secondary.keyed_batches(epoch, cycle + 1)[offset:]
            yield from self.secondary._loader(keyed)
            cycle, offset = cycle + 1, 0

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]:
        """Pairs of `epoch` from micro-batch `start` on."""
        return zip(self.primary.batches(epoch, start), self._secondary(epoch, start))
