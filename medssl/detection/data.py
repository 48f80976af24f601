"""MedMask's data: the run config's splits, transforms and batches (labelled, validation, unlabelled target)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from medssl.data.coco import ConcatDetection, build_dataset, collate_detection, make_transforms
from medssl.data.epochs import EpochBatches

__all__ = ["Indexed", "build_splits", "epoch_batches", "eval_loader", "to_device", "transforms"]


class Indexed(Dataset):
    """Adds the sample index to the target so that files (and embeddings) can be found again."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Any, dict]:
        img, t = self.ds[i]
        return img, {**t, "index": torch.tensor(i)}


def transforms(cfg: dict, kind: str) -> Any:
    """The run's transforms of a kind (``weak``, ``weak_strong``, ``none``)."""
    d = cfg["data"]
    return make_transforms(kind, max_size=d["max_size"], sizes=d["sizes"], in_chans=d["in_chans"],
                           mean=d["mean"], std=d["std"])


PAD_MULTIPLE = 32  # batches pad to this (every backbone stride and ViT patch divides it); predict pads alike
_COLLATE = partial(collate_detection, pad_to_multiple=PAD_MULTIPLE)


def epoch_batches(ds: Dataset, cfg: dict, seed: int, rank: int, world_size: int) -> EpochBatches:
    """Seekable, rank-sharded training epochs of a detection dataset (images, masks, targets with index)."""
    d = cfg["data"]
    return EpochBatches(Indexed(ds), d["batch_size"], seed=seed, rank=rank, world_size=world_size, shuffle=True,
                        collate=_COLLATE, workers=d["workers"])


def eval_loader(ds: Dataset, batch_size: int, indices: list[int] | None = None) -> DataLoader:
    """In-order batches (of `indices` only, if given) for evaluation and prediction."""
    data = Indexed(ds) if indices is None else torch.utils.data.Subset(Indexed(ds), indices)
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=_COLLATE)


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    """Move a list of target dicts to `device`."""
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def build_splits(cfg: dict) -> dict[str, Dataset]:
    """Labelled train (weak aug; ``data.train_split`` may list several splits, concatenated), val (no aug) and
    unlabelled target (weak+strong views) datasets."""
    d = cfg["data"]
    if d["registry"]:
        from medssl.data.coco import load_registry

        load_registry(d["registry"])
    target_name = d["target_dataset"] or d["dataset"]
    names = d["train_split"] if isinstance(d["train_split"], list) else [d["train_split"]]
    parts = [build_dataset(d["dataset"], n, d["data_root"], transforms(cfg, "weak")) for n in names]
    return {"train": parts[0] if len(parts) == 1 else ConcatDetection(parts),
            "val": build_dataset(d["dataset"], d["val_split"], d["data_root"], transforms(cfg, "none")),
            "target": build_dataset(target_name, d["target_split"], d["data_root"], transforms(cfg, "weak_strong"))}
