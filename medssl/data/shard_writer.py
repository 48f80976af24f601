"""Write LUMID WebDataset shards: `.npy` image + `.json` metadata per sample.

Shards are written under a temporary name and renamed when closed, so a shard that exists under its
final name is always complete. `_info.json` lists the sample count per finished shard in the layout
that timm's WebDataset reader and `medssl.data.shards` understand.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SHARD_PATTERN = "lumid-{index:06d}.tar"
INFO_NAME = "_info.json"


def encode_npy(array: np.ndarray) -> bytes:
    """Serialise an array to `.npy` bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


class ShardWriter:
    """Write samples to numbered tar shards in `out_dir`, `samples_per_shard` per shard.

    Args:
        out_dir: folder for `lumid-000000.tar`, ...
        samples_per_shard: samples before a shard is closed and a new one started.
        start_index: number of the first shard written (to append after finished shards).

    Example:
        >>> with ShardWriter("shards", samples_per_shard=1000) as w:  # doctest: +SKIP
        ...     w.write("ct-0001", image, {"modality": "CT"})
    """

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 1000, start_index: int = 0,
                 on_close: Callable[[dict[str, Any]], None] | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.on_close = on_close
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.index = start_index
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._keys: list[str] = []
        self.finished: list[dict[str, Any]] = []  # [{"name": ..., "count": ..., "keys": [...]}]

    @property
    def pending_keys(self) -> list[str]:
        """Keys written to the shard in progress (not yet safe on disk); empty once a shard closed."""
        return list(self._keys)

    def _open(self) -> None:
        name = SHARD_PATTERN.format(index=self.index)
        self._tmp = self.out_dir / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w")
        self._count = 0
        self._keys = []

    def write(self, key: str, image: np.ndarray, meta: Mapping[str, Any]) -> None:
        """Append one sample (`key.npy`, `key.json`); keys must not contain dots."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        now = time.time()
        _add_member(self._tar, f"{key}.npy", encode_npy(image), now)
        _add_member(self._tar, f"{key}.json", json.dumps(dict(meta), sort_keys=True).encode(), now)
        self._count += 1
        self._keys.append(key)
        if self._count >= self.samples_per_shard:
            self.close_shard()

    def close_shard(self) -> dict[str, Any] | None:
        """Close the shard in progress (if any), rename it to its final name and return its record."""
        if self._tar is None:
            return None
        self._tar.close()
        assert self._tmp is not None
        final = self.out_dir / SHARD_PATTERN.format(index=self.index)
        os.replace(self._tmp, final)
        record = {"name": final.name, "count": self._count, "keys": list(self._keys)}
        self.finished.append(record)
        self._tar, self._tmp = None, None
        self._count, self._keys = 0, []  # nothing pending until the next write opens a shard
        self.index += 1
        if self.on_close is not None:
            self.on_close(record)
        return record

    def close(self) -> None:
        """Close the last shard and update `_info.json`."""
        self.close_shard()
        write_info(self.out_dir)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finished_shards(out_dir: str | os.PathLike) -> list[Path]:
    """Complete shards in `out_dir` (final names only; temporary files of a killed run are ignored)."""
    return sorted(Path(out_dir).glob("lumid-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def next_shard_index(out_dir: str | os.PathLike) -> int:
    """Index for the next shard: one past the highest finished shard (0 for an empty folder)."""
    shards = finished_shards(out_dir)
    return int(shards[-1].stem.split("-")[1]) + 1 if shards else 0


def remove_partial_shards(out_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary shard files left by a killed run; returns what was removed."""
    removed = sorted(Path(out_dir).glob(".lumid-*.tar.tmp"))
    for path in removed:
        path.unlink()
    return removed


def shard_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys stored in one shard, in order."""
    with tarfile.open(path) as tar:
        return [m.name[: -len(".npy")] for m in tar.getmembers() if m.name.endswith(".npy")]


def read_sample(path: str | os.PathLike, key: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one sample (`key.npy`, `key.json`) back from a shard (contact sheets, tests)."""
    with tarfile.open(path) as tar:
        try:
            npy, meta = tar.extractfile(f"{key}.npy"), tar.extractfile(f"{key}.json")
        except KeyError as exc:
            raise KeyError(f"{path}: no sample {key!r}") from exc
        assert npy is not None and meta is not None
        return np.load(io.BytesIO(npy.read()), allow_pickle=False), json.loads(meta.read())


def write_info(out_dir: str | os.PathLike, counts: Mapping[str, int] | None = None) -> dict[str, Any]:
    """(Re)write `_info.json` from the finished shards in `out_dir` and return it.

    Args:
        out_dir: the shard folder.
        counts: samples per shard name when already known (skips reading every shard's member list).
    """
    out = Path(out_dir)
    shards = []
    for path in finished_shards(out):
        n = counts[path.name] if counts is not None and path.name in counts else len(shard_keys(path))
        shards.append({"url": path.name, "num_samples": n})
    info = {
        "name": "lumid",
        "splits": {"train": {"name": "train", "filenames": [s["url"] for s in shards],
                             "shard_lengths": [s["num_samples"] for s in shards],
                             "num_samples": sum(s["num_samples"] for s in shards)}},
        "shards": shards,
    }
    tmp = out / f".{INFO_NAME}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / INFO_NAME)
    return info


def write_array_shards(images: Iterable[np.ndarray], out_dir: str | os.PathLike, samples_per_shard: int = 100,
                       meta: Mapping[str, Any] | None = None, prefix: str = "img") -> dict[str, Any]:
    """Write a stack of 2-D arrays as shards (tests and demos); returns the `_info.json` content."""
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for i, img in enumerate(images):
            writer.write(f"{prefix}{i:07d}", np.asarray(img), {"index": i, **(meta or {})})
    return json.loads((Path(out_dir) / INFO_NAME).read_text())
