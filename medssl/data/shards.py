"""The MAE pretraining loader over LUMID WebDataset shards (`key.npy` 2-D image or 3-D volume + `key.json`).

The stream is a pure function of (seed, rank, worker) and addressable by position: each reader's shards per
epoch, the shuffle (a seeded permutation of each block of `shuffle_buffer` consecutive samples, restarted at
every block) and each sample's augmentation (seeded by its position) are fixed in advance, so `start_step`
seeks straight to the resume point through the per-shard sample counts of `_info.json` and reads at most one
block: resuming costs the same at any step and yields exactly the batches an uninterrupted run would.
A corrupt sample keeps its position and is replaced by the next readable one (counted, never fatal).
Volume shards (`build_shards --dims 3`, `dims=3` here) go through the same stream; each volume gives one random
crop of `img_size`^3 voxels (a volume smaller than the crop is zero-padded, counted and logged).

Example:
    >>> loader = make_loader("shards/lumid-{000000..000009}.tar", img_size=224, batch_size=64)  # doctest: +SKIP
    >>> imgs = next(iter(loader))  # [64, 1, 224, 224] float32, normalised
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import tarfile
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
MAX_CORRUPT_RUN = 10_000  # corrupt samples in a row before giving up


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


def _listed_sizes(urls: Sequence[str]) -> list[int | None]:
    """Per-shard sample counts from the `_info.json` next to each shard (None where it is not listed)."""
    infos: dict[str, dict[str, int]] = {}
    out: list[int | None] = []
    for u in urls:
        folder = os.path.dirname(u)
        if folder not in infos:
            try:
                info = json.loads((Path(folder) / "_info.json").read_text())
                infos[folder] = {s["url"]: int(s["num_samples"]) for s in info.get("shards", [])}
            except (OSError, ValueError, KeyError, TypeError):
                infos[folder] = {}
        out.append(infos[folder].get(os.path.basename(u)))
    return out


def count_samples(urls: Sequence[str]) -> int | None:
    """Sample count from the shards' `_info.json` files when every shard is listed there (once), else None."""
    sizes = _listed_sizes(urls)
    if len(set(urls)) != len(urls) or any(n is None for n in sizes):
        return None
    return sum(n for n in sizes if n is not None)


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _open_tar(url: str) -> tarfile.TarFile:
    """A tar reader: random access for local files (skipped members are seeked over), a stream otherwise."""
    if _is_remote(url):
        return tarfile.open(fileobj=wds.gopen(url), mode="r|*")
    return tarfile.open(url, mode="r:" if url.endswith(".tar") else "r:*")


def _sample_key(name: str) -> tuple[str, str]:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more`): members sharing a key form one sample (as in WebDataset)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _scan_size(url: str) -> int:
    """Samples in a local shard, from its tar headers alone; 0 (with a warning) when it cannot be read."""
    keys, last = 0, None
    try:
        with _open_tar(url) as tar:
            for m in tar:
                key = _sample_key(m.name)[0]
                if m.isfile() and key != last:
                    keys, last = keys + 1, key
    except (tarfile.TarError, OSError, EOFError) as exc:
        log.warning("shard %s cannot be read (%s): it counts as empty", url, exc)
        return 0
    return keys


def shard_sizes(urls: Sequence[str]) -> list[int]:
    """Samples per shard: from `_info.json`, else counted from a local shard's tar headers.

    Raises:
        ValueError: a remote shard is not listed in an `_info.json` (its size would need a full read).
    """
    sizes = _listed_sizes(urls)
    for i, (u, n) in enumerate(zip(urls, sizes)):
        if n is None:
            if _is_remote(u):
                raise ValueError(f"shard {u} is not listed in an _info.json beside it: the loader needs every "
                                 "shard's sample count to seek (data_tools.build_shards writes _info.json)")
            sizes[i] = _scan_size(u)
    return [int(n or 0) for n in sizes]


def read_shard(url: str, start: int, stop: int) -> Iterator[dict[str, Any] | None]:
    """Samples `start` .. `stop - 1` of one shard, exactly `stop - start` items.

    Members before `start` are skipped unread (local shards seek over them); only each sample's `.npy`
    member is read. Where the shard ends early or breaks, the missing samples come as None.
    """
    got, index, key, sample = 0, -1, None, None
    try:
        with _open_tar(url) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = _sample_key(m.name)
                if k != key:
                    if sample is not None:
                        yield sample
                        got, sample = got + 1, None
                    index, key = index + 1, k
                    if index >= stop:
                        break
                    if index >= start:
                        sample = {"__key__": k, "__url__": url}
                if sample is not None and ext == "npy":
                    member = tar.extractfile(m)
                    sample["npy"] = member.read() if member is not None else b""
            if sample is not None:
                yield sample
                got += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        log.warning("shard %s breaks after %d samples: %s", url, start + got, exc)
    for _ in range(stop - start - got):  # shorter than listed: keep every later position where it belongs
        yield None


def decode_npy(data: bytes, dims: int = 2) -> np.ndarray:
    """Decode `.npy` bytes (no pickle) to a `dims`-D array (2-D image, 3-D volume); ValueError on anything else."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim == dims + 1 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != dims:
        what = "2-D image" if dims == 2 else f"{dims}-D volume"
        raise ValueError(f"expected a {what}, got shape {arr.shape}"
                         + (" (2-D shards: set data.dims=2)" if dims == 3 and arr.ndim == 2 else ""))
    if arr.dtype not in (np.uint8, np.uint16, np.float16, np.float32):
        raise ValueError(f"unsupported dtype {arr.dtype}")
    return arr


def to_unit_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 / uint16 / float image or volume -> float32 [1, H, W] (or [1, D, H, W]) in [0, 1]."""
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


def random_crop_3d(vol: torch.Tensor, size: Sequence[int], hflip: bool, g: torch.Generator) -> torch.Tensor:
    """A random `size` crop of a [C, D, H, W] volume (+ optional left-right flip of the last axis) with
    generator `g`; an axis shorter than the crop is zero-padded evenly on both sides first."""
    pad: list[int] = []
    for n, s in zip(reversed(vol.shape[1:]), reversed(list(size))):  # F.pad wants the last axis first
        extra = max(0, s - n)
        pad += [extra // 2, extra - extra // 2]
    if any(pad):
        vol = F.pad(vol, pad)
    starts = [int(torch.randint(0, n - s + 1, (1,), generator=g)) for n, s in zip(vol.shape[1:], size)]
    (z, y, x), (sd, sh, sw) = starts, size
    out = vol[:, z:z + sd, y:y + sh, x:x + sw]
    if hflip and torch.rand(1, generator=g).item() < 0.5:
        out = out.flip(-1)
    return out.contiguous()  # [C, sd, sh, sw]


def shards_dims(urls: Sequence[str]) -> int | None:
    """2 or 3 as recorded in the `build_config.json` beside local shards (None where none is found)."""
    for folder in sorted({os.path.dirname(u) for u in urls if not _is_remote(u)}):
        try:
            return int(json.loads((Path(folder) / "build_config.json").read_text()).get("dims", 2))
        except (OSError, ValueError, TypeError):
            continue
    return None


class _LocalCounter:
    """Stand-in for multiprocessing.Value in processes that cannot share one."""

    def __init__(self, value: int = 0):
        self.value = value

    def get_lock(self):
        return contextlib.nullcontext()


class ShardStream(IterableDataset):
    """An endless, deterministic stream of augmented batches from WebDataset shards.

    Reader `slot = rank * W + worker` (W DataLoader workers) reads, in epoch `e`, its share of the shards
    (`resampled`: shards drawn with replacement) one after the other; its samples are cut into blocks of
    `shuffle_buffer` and each block is permuted by a generator seeded with (seed, slot, e, block). The
    reader's batch `k` holds its stream positions `k * B .. k * B + B - 1`, each augmented with a generator
    seeded by its position, and global batch `j * W + w` comes from worker `w`. So a batch is a function of
    the positions alone: `start_step` seeks to the first position to read with the shard sizes (`_info.json`)
    and reads from the start of its block, never the samples before. A corrupt sample keeps its position
    and is replaced by the next readable sample of the stream (re-augmented with its own position's crop).
    """

    def __init__(self, urls: Sequence[str], img_size: int, batch_size: int, *, in_chans: int = 1,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,),
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, resampled: bool = False,
                 shuffle_buffer: int = 1000, start_step: int = 0, min_size: int = 1, dims: int = 2,
                 crop_size: Sequence[int] | None = None):
        super().__init__()
        if batch_size < 1 or shuffle_buffer < 1 or start_step < 0:
            raise ValueError(f"batch_size and shuffle_buffer must be >= 1 and start_step >= 0, got {batch_size}, "
                             f"{shuffle_buffer}, {start_step}")
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        self.urls, self.img_size, self.batch_size = list(urls), img_size, batch_size
        self.dims = dims
        recorded = shards_dims(self.urls)
        if recorded is not None and recorded != dims:
            raise ValueError(f"the shards in {os.path.dirname(self.urls[0])} were built with --dims {recorded}, "
                             f"the loader reads {dims}-D samples (set data.dims={recorded})")
        self.crop = tuple(int(c) for c in (crop_size or (img_size,) * 3))  # 3-D: [D, H, W] of a crop
        if dims == 3 and (len(self.crop) != 3 or min(self.crop) < 1):
            raise ValueError(f"crop_size must be 3 positive ints, got {crop_size}")
        self.in_chans = in_chans
        view = (-1,) + (1,) * dims
        self.mean = torch.tensor(mean, dtype=torch.float32).view(*view)
        self.std = torch.tensor(std, dtype=torch.float32).view(*view)
        if len(self.mean) not in (1, in_chans) or len(self.std) not in (1, in_chans):
            raise ValueError(f"mean/std must have 1 or {in_chans} values, got {list(mean)} / {list(std)}")
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.seed, self.rank, self.world_size, self.resampled = seed, rank, world_size, resampled
        self.shuffle_buffer, self.start_step, self.min_size = shuffle_buffer, start_step, min_size
        self.sizes = np.asarray(shard_sizes(self.urls), dtype=np.int64)  # [num_shards] samples per shard
        if not self.sizes.any():
            raise ValueError(f"no samples could be read from {len(self.urls)} shard(s) ({self.urls[:3]}"
                             f"{' ...' if len(self.urls) > 3 else ''}): empty or unreadable tar files")
        self._corrupt = multiprocessing.Value("q", 0)  # shared with forked DataLoader workers
        self._padded = multiprocessing.Value("q", 0)  # volumes smaller than the crop (zero-padded)
        self._logged = 0  # corrupt samples this process has seen (for sparse logging)
        self._logged_padded = 0

    @property
    def corrupt(self) -> int:
        """Corrupt samples skipped so far, over this process and its (forked) loader workers."""
        return int(self._corrupt.value)

    @property
    def padded(self) -> int:
        """Volumes smaller than the crop (zero-padded) decoded so far, over this process and its forked workers."""
        return int(self._padded.value)

    def _count_corrupt(self) -> None:
        with self._corrupt.get_lock():
            self._corrupt.value += 1

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: count locally (a Value cannot be pickled)
        state = dict(self.__dict__)
        state["_corrupt"] = _LocalCounter(self.corrupt)
        state["_padded"] = _LocalCounter(self.padded)
        return state

    def epoch_shards(self, slot: int, slots: int, epoch: int) -> np.ndarray:
        """Indices into `urls` of the shards reader `slot` of `slots` reads in `epoch`, in order."""
        if self.resampled:
            rng = np.random.default_rng(stable_seed(self.seed, 1, epoch, slot))
            return rng.integers(0, len(self.urls), max(1, len(self.urls) // slots))
        return np.random.default_rng(stable_seed(self.seed, 0, epoch)).permutation(len(self.urls))[slot::slots]

    def _epoch_samples(self, shards: np.ndarray, start: int) -> Iterator[dict[str, Any] | None]:
        """The epoch's samples (its shards one after the other) from epoch position `start` on."""
        for i in shards:
            n = int(self.sizes[i])
            if start < n:
                yield from read_shard(self.urls[i], start, n)
            start = max(0, start - n)

    def positions(self, slot: int, slots: int, start: int = 0) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(position, raw sample or None) of reader `slot`'s stream from position `start` on, forever.

        Only the block holding `start` is read before it: epochs and shards are skipped by their sizes.
        """
        if not self.resampled and len(self.urls) < slots:
            raise ValueError(f"{len(self.urls)} shards cannot feed {slots} readers (ranks x workers): "
                             "use resampled=True or more shards")
        block, pos = self.shuffle_buffer, 0  # pos: stream position where the epoch starts
        for epoch in itertools.count():
            shards = self.epoch_shards(slot, slots, epoch)
            n = int(self.sizes[shards].sum())
            if pos + n <= start:
                pos += n
                continue
            first = max(0, start - pos) // block
            samples = self._epoch_samples(shards, first * block)
            for b in range(first, -(-n // block)):
                chunk = list(itertools.islice(samples, block))  # the block's samples, in shard order
                order = list(range(len(chunk)))
                random.Random(stable_seed(self.seed, 2, slot, epoch, b)).shuffle(order)
                for i, j in enumerate(order):
                    if pos + b * block + i >= start:
                        yield pos + b * block + i, chunk[j]
            pos += n

    def _decode(self, sample: dict[str, Any] | None) -> tuple[np.ndarray | None, str]:
        """(2-D image, "") or (None, why) for a sample that cannot be used (counted as corrupt)."""
        try:
            if sample is None:
                raise ValueError("missing: its shard is shorter than _info.json lists or broke")
            arr = decode_npy(sample["npy"], self.dims)
            if self.dims == 2 and min(arr.shape) < self.min_size:
                raise ValueError(f"image {arr.shape} is smaller than one patch ({self.min_size} px)")
            if self.dims == 3 and any(n < c for n, c in zip(arr.shape, self.crop)):
                self._note_padded(sample, arr.shape)
            return arr, ""
        except Exception as exc:  # missing .npy, bad bytes, wrong shape
            self._count_corrupt()
            self._logged += 1
            where = f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}" if sample else "a sample"
            if self._logged <= 20 or self._logged % 1000 == 0:  # the first ones, then every 1000th
                log.warning("skipping corrupt sample %s (%d in this reader so far): %s", where, self._logged, exc)
            return None, f"{where}: {exc}"

    def _note_padded(self, sample: dict[str, Any], shape: tuple[int, ...]) -> None:
        with self._padded.get_lock():
            self._padded.value += 1
        self._logged_padded += 1
        if self._logged_padded <= 20 or self._logged_padded % 1000 == 0:
            log.warning("volume %s in %s %s is smaller than the %s crop: zero-padded (%d in this reader so far)",
                        sample.get("__key__", "?"), sample.get("__url__", "?"), tuple(shape), self.crop,
                        self._logged_padded)

    def _augment(self, arr: np.ndarray, slot: int, pos: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(stable_seed(self.seed, 3, slot, pos))
        if self.dims == 3:
            vol = random_crop_3d(to_unit_tensor(arr), self.crop, self.hflip, g)  # [1, D, H, W]
            return (vol.expand(self.in_chans, -1, -1, -1) - self.mean) / self.std  # [C, D, H, W]
        img = random_resized_crop(to_unit_tensor(arr), self.img_size, self.scale, self.ratio, self.hflip, g)
        return (img.expand(self.in_chans, -1, -1) - self.mean) / self.std  # [C, S, S]

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        # The DataLoader always starts with its worker 0; after `start_step` batches the next one belongs to
        # logical worker start_step % W, so rotate the roles to keep the stream identical.
        worker = ((info.id if info else 0) + self.start_step) % workers
        first = max(0, -(-(self.start_step - worker) // workers))  # this worker's first batch: ceil((s - w) / W)
        slot, slots, bs = self.rank * workers + worker, self.world_size * workers, self.batch_size
        stream = self.positions(slot, slots, first * bs)
        window: list[tuple[int, np.ndarray | None, str]] = []  # decoded positions from the batch's first on

        def fill(n: int) -> None:
            while len(window) < n:
                pos, sample = next(stream)
                window.append((pos, *self._decode(sample)))

        while True:
            fill(bs)
            batch = []
            for i in range(bs):
                j = i
                while window[j][1] is None:  # corrupt: the next readable sample takes its place
                    j += 1
                    if j - i > MAX_CORRUPT_RUN:
                        raise ValueError(f"{j - i} corrupt samples in a row and none readable "
                                         f"(last: {window[j - 1][2]})")
                    fill(j + 1)
                batch.append(self._augment(window[j][1], slot, window[i][0]))
            del window[:bs]
            yield torch.stack(batch)  # [B, C, S, S] (3-D: [B, C, D, H, W])


def make_loader(urls: str | Sequence[str], img_size: int, batch_size: int, *, num_workers: int = 0,
                seed: int = 0, rank: int = 0, world_size: int = 1, resampled: bool | None = None,
                start_step: int = 0, **stream_kwargs: Any) -> DataLoader:
    """DataLoader over the shard stream; yields normalised [B, C, img_size, img_size] float batches forever
    ([B, C, D, H, W] crops with `dims=3`).

    `resampled` defaults to True when several processes or workers read, so that no reader runs dry.
    `start_step` (batches this rank has already taken) seeks without reading the samples before it.
    """
    shard_list = expand_urls(urls)
    if resampled is None:
        resampled = world_size * max(1, num_workers) > len(shard_list)
    stream = ShardStream(shard_list, img_size, batch_size, seed=seed, rank=rank, world_size=world_size,
                         resampled=resampled, start_step=start_step, **stream_kwargs)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)
