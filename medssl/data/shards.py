"""The MAE pretraining loader over LUMID WebDataset shards (`key.npy` 2-D image + `key.json`).

The stream is deterministic given (seed, rank, worker): shard order, shuffle buffer and every sample's
augmentation come from seeded generators, so a run resumed at step `s` sees exactly the batches an
uninterrupted run would (`start_step`). Corrupt samples are skipped and counted, never fatal.

Example:
    >>> loader = make_loader("shards/lumid-{000000..000009}.tar", img_size=224, batch_size=64)  # doctest: +SKIP
    >>> imgs = next(iter(loader))  # [64, 1, 224, 224] float32, normalised
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medssl.utils import stable_seed

log = logging.getLogger("medssl")
MAX_CORRUPT_RUN = 10_000  # corrupt samples in a row (beyond the shuffle buffer) before giving up


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand brace patterns, folders (all `*.tar` inside) and lists; check local files exist."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"shard folder {item} contains no .tar shards")
            out.extend(found)
            continue
        for u in braceexpand.braceexpand(item):
            if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u):
                raise FileNotFoundError(f"shard {u} does not exist (from {item!r})")
            out.append(u)
    if not out:
        raise ValueError(f"no shards given ({urls!r})")
    return out


def count_samples(urls: Sequence[str]) -> int | None:
    """Sample count from the shards' `_info.json` files when every shard is listed there, else None."""
    total, seen = 0, set()
    infos: dict[str, dict[str, int]] = {}
    for u in urls:
        folder = os.path.dirname(u)
        if folder not in infos:
            f = Path(folder) / "_info.json"
            try:
                info = json.loads(f.read_text())
                infos[folder] = {s["url"]: int(s["num_samples"]) for s in info.get("shards", [])}
            except (OSError, ValueError, KeyError, TypeError):
                infos[folder] = {}
        name = os.path.basename(u)
        if name not in infos[folder] or u in seen:
            return None
        seen.add(u)
        total += infos[folder][name]
    return total


def decode_npy(data: bytes) -> np.ndarray:
    """Decode `.npy` bytes (no pickle) to a 2-D array; raises ValueError on anything else."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16, np.float16, np.float32):
        raise ValueError(f"unsupported dtype {arr.dtype}")
    return arr


def to_unit_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 / uint16 / float image -> float32 [1, H, W] in [0, 1]."""
    if arr.dtype == np.uint8:
        x = torch.from_numpy(arr.astype(np.float32) / 255.0)
    elif arr.dtype == np.uint16:
        x = torch.from_numpy(arr.astype(np.float32) / 65535.0)
    else:
        x = torch.from_numpy(np.nan_to_num(arr.astype(np.float32))).clamp(0, 1)
    return x[None]


def random_resized_crop(img: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        hflip: bool, g: torch.Generator) -> torch.Tensor:
    """torchvision-style RandomResizedCrop (+ optional horizontal flip) on [C, H, W] with generator `g`."""
    _, h, w = img.shape
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g).item())
        ar = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=g).item())
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            break
    else:  # central crop at the ratio bounds
        in_ratio = w / h
        cw, ch = (w, int(round(w / ratio[0]))) if in_ratio < ratio[0] else (
            (int(round(h * ratio[1])), h) if in_ratio > ratio[1] else (w, h))
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = img[:, top:top + ch, left:left + cw]
    out = F.interpolate(crop[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    if hflip and torch.rand(1, generator=g).item() < 0.5:
        out = out.flip(-1)
    return out


class _LocalCounter:
    """Stand-in for multiprocessing.Value in processes that cannot share one."""

    def __init__(self, value: int = 0):
        self.value = value

    def get_lock(self):
        return contextlib.nullcontext()


class ShardStream(IterableDataset):
    """An endless, deterministic stream of augmented batches from WebDataset shards.

    Each (rank, worker) reads its share of the shards (or, with `resampled`, draws shards with
    replacement), shuffles samples in a buffer, decodes `.npy`, crops/flips/normalises, and yields batches
    of `batch_size`. With DataLoader workers, global batch `j * W + w` comes from worker `w`;
    `start_step` skips the batches already trained on (decoded, not augmented) so that resuming is exact.
    """

    def __init__(self, urls: Sequence[str], img_size: int, batch_size: int, *, in_chans: int = 1,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,),
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, resampled: bool = False,
                 shuffle_buffer: int = 1000, start_step: int = 0, min_size: int = 1):
        super().__init__()
        self.urls, self.img_size, self.batch_size = list(urls), img_size, batch_size
        self.in_chans = in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if len(self.mean) not in (1, in_chans) or len(self.std) not in (1, in_chans):
            raise ValueError(f"mean/std must have 1 or {in_chans} values, got {list(mean)} / {list(std)}")
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.seed, self.rank, self.world_size, self.resampled = seed, rank, world_size, resampled
        self.shuffle_buffer, self.start_step, self.min_size = shuffle_buffer, start_step, min_size
        self._corrupt = multiprocessing.Value("q", 0)  # shared with forked DataLoader workers
        self._opened = self._opened_at_raw = 0

    @property
    def corrupt(self) -> int:
        """Corrupt samples skipped so far, over this process and its (forked) loader workers."""
        return int(self._corrupt.value)

    def _count_corrupt(self) -> None:
        with self._corrupt.get_lock():
            self._corrupt.value += 1

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: count locally (a Value cannot be pickled)
        state = dict(self.__dict__)
        state["_corrupt"] = _LocalCounter(self.corrupt)
        return state

    def _check_not_starving(self, limit: int) -> None:
        self._opened += 1
        if self._opened - self._opened_at_raw > limit:
            raise ValueError(f"no samples could be read from {self._opened - self._opened_at_raw} shard openings in a "
                             f"row (shards: {self.urls[:3]}{' ...' if len(self.urls) > 3 else ''}): empty or "
                             "unreadable tar files")

    def _shards(self, worker: int, workers: int) -> Iterator[str]:
        slot, slots = self.rank * workers + worker, self.world_size * workers
        for epoch in range(10**9):
            if self.resampled:
                rng = random.Random(stable_seed(self.seed, 1, epoch, slot))
                for _ in range(max(1, len(self.urls) // slots)):
                    self._check_not_starving(2 * len(self.urls) + 2)
                    yield rng.choice(self.urls)
            else:
                order = list(self.urls)
                random.Random(self.seed * 1000003 + epoch).shuffle(order)
                mine = order[slot::slots]
                if not mine and epoch == 0:
                    raise ValueError(f"{len(self.urls)} shards cannot feed {slots} readers (ranks x workers): "
                                     "use resampled=True or more shards")
                for url in mine:
                    self._check_not_starving(2 * len(mine))
                    yield url

    def _samples(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        def on_error(exc: Exception) -> bool:
            self._count_corrupt()
            log.warning("skipping unreadable shard data: %s", exc)
            return True

        pipeline = wds.tarfile_to_samples(handler=on_error)
        raw = pipeline({"url": u} for u in self._shards(worker, workers))
        rng = random.Random(stable_seed(self.seed, 2, self.rank, worker))
        buf: list[dict[str, Any]] = []
        for sample in raw:
            self._opened_at_raw = self._opened
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        # The DataLoader always starts with its worker 0; after `start_step` batches the next one belongs to
        # logical worker start_step % W, so rotate the roles to keep the stream identical.
        worker = ((info.id if info else 0) + self.start_step) % workers
        skip = max(0, -(-(self.start_step - worker) // workers)) * self.batch_size  # ceil((s - w) / W) batches
        batch: list[torch.Tensor] = []
        index, bad_run = 0, 0
        for sample in self._samples(worker, workers):
            key = sample.get("__key__", "?")
            try:
                arr = decode_npy(sample["npy"])
                if min(arr.shape) < self.min_size:
                    raise ValueError(f"image {arr.shape} is smaller than one patch ({self.min_size} px)")
            except Exception as exc:  # missing .npy, bad bytes, wrong shape
                self._count_corrupt()
                bad_run += 1
                log.warning("skipping corrupt sample %s in %s: %s", key, sample.get("__url__", "?"), exc)
                if bad_run > self.shuffle_buffer + MAX_CORRUPT_RUN:
                    raise ValueError(f"{bad_run} corrupt samples in a row and none readable (last: {key} in "
                                     f"{sample.get('__url__', '?')}: {exc})") from exc
                continue
            bad_run = 0
            index += 1
            if skip:
                skip -= 1
                continue
            g = torch.Generator().manual_seed(stable_seed(self.seed, 3, self.rank, worker, index))
            img = random_resized_crop(to_unit_tensor(arr), self.img_size, self.scale, self.ratio, self.hflip, g)
            img = img.expand(self.in_chans, -1, -1)
            batch.append((img - self.mean) / self.std)
            if len(batch) == self.batch_size:
                yield torch.stack(batch)  # [B, C, S, S]
                batch = []


def make_loader(urls: str | Sequence[str], img_size: int, batch_size: int, *, num_workers: int = 0,
                seed: int = 0, rank: int = 0, world_size: int = 1, resampled: bool | None = None,
                start_step: int = 0, **stream_kwargs: Any) -> DataLoader:
    """DataLoader over the shard stream; yields normalised [B, C, img_size, img_size] float batches forever.

    `resampled` defaults to True when several processes or workers read, so that no reader runs dry.
    """
    shard_list = expand_urls(urls)
    if resampled is None:
        resampled = world_size * max(1, num_workers) > len(shard_list)
    stream = ShardStream(shard_list, img_size, batch_size, seed=seed, rank=rank, world_size=world_size,
                         resampled=resampled, start_step=start_step, **stream_kwargs)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)
