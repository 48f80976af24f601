"""Frozen-encoder features, computed once and reused: what makes probes and kNN cheap.

A `cacheable` head (`LinearProbe`, `DenseProbe`) reads its frozen backbone through `features()` and trains only
its `head`. `frozen_features` runs `features()` over a dataset of (image, target) pairs; `FeatureCache` keeps
the features of whole splits by key, so that every cell of one backbone and task (each label subset, learning
rate and protocol: probe, kNN) shares one pass of the backbone. `train_supervised(..., features=...)` trains the
head on them instead of recomputing them.

Example:
    >>> cache = FeatureCache()
    >>> feats = cache.get("vit|qc|blocks 4", probe, {"train": train_set, "val": val_set})  # doctest: +SKIP
    >>> fit(probe, None, None, loss_fn, score_fn, cfg, features=(feats["train"], feats["val"]))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from medssl.data.epochs import ordered_batches

__all__ = ["FeatureCache", "frozen_features", "subset"]


@torch.no_grad()
def frozen_features(model: nn.Module, data: Dataset, batch_size: int = 64,
                    device: str | torch.device | None = None) -> TensorDataset:
    """(features [N, F...] float32, targets) of every (image, target) pair of `data` through `model.features()`.

    Runs in eval mode on `device` (default: where the model is); the outputs stay there.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    feats, tgts = [], []
    for x, y in ordered_batches(data, batch_size):
        feats.append(model.features(x.to(dev)).float())  # [n, F...]
        tgts.append(y.to(dev))
    return TensorDataset(torch.cat(feats), torch.cat(tgts))


def subset(data: TensorDataset, index: torch.Tensor) -> TensorDataset:
    """The samples `index` of a tensor dataset, as a tensor dataset (e.g. a label subset of cached features)."""
    return TensorDataset(*(t[index] for t in data.tensors))


class FeatureCache:
    """Features of whole splits by key (`frozen_features`), computed once and reused; holds the newest `size` keys.

    The key must name everything the features depend on: the backbone's weights, the data, the head's blocks and
    pooling, the normalisation (and the seed of a randomly initialised backbone).
    """

    def __init__(self, size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"FeatureCache size must be >= 1, got {size}")
        self.size = size
        self._entries: dict[str, dict[str, TensorDataset]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str, model: nn.Module, splits: Mapping[str, Dataset], batch_size: int = 64
            ) -> dict[str, TensorDataset]:
        """The features of every split (`frozen_features`), computed on the first call with this key."""
        if key not in self._entries:
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))  # the oldest key goes
            self._entries[key] = {name: frozen_features(model, data, batch_size) for name, data in splits.items()}
        return self._entries[key]
