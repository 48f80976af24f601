"""Held-out test images, identified by content, and the check that a pretraining pool holds none of them.

A pretrained row of a transfer table means something only if the encoder never saw the task's test images.
Paths and names prove nothing (the same image ships in several files, transfer syntaxes and packages), so an
image is identified by its **content keys**:

- ``file:<sha256>`` of the file's bytes;
- ``pixels:<sha256>`` of the decoded pixel array (shape + float32 values): the same image re-encoded
  losslessly (another transfer syntax, ``.nii`` vs ``.nii.gz``) has the same key;
- ``instance:<SOPInstanceUID>`` and ``series:<SeriesInstanceUID>`` for DICOM: a lossy copy of a test image, or
  another slice of a test series, is refused too.

A task declares the files its test split comes from (``TaskData.info["test_files"]``; where one subject
gives several files, e.g. a template and its tissue maps, it declares them all). A pool records the keys of
its source files in ``pool.json`` (``write_pool_record``), and ``check_disjoint`` refuses a pool that shares
any key with a task's test files. Keys are computed once per file content and cached by the file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

POOL_RECORD = "pool.json"
_KEYS: dict[str, list[str]] = {}  # file sha256 -> content keys (files do not change under one sha256)


class PoolOverlapError(ValueError):
    """A pretraining pool holds an image of a task's test split."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_keys(path: str | Path) -> list[str]:
    """The content keys of one image file (see the module docstring), sorted; unreadable files get ``file:`` only."""
    digest = file_sha256(path)
    if digest in _KEYS:
        return _KEYS[digest]
    keys = {f"file:{digest}"}
    try:
        from medssl.data.imaging import read_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = read_image(path)
        px = np.ascontiguousarray(img.pixels, dtype=np.float32)
        keys.add("pixels:" + hashlib.sha256(repr(px.shape).encode() + px.tobytes()).hexdigest())
        for kind in ("instance", "series"):
            uid = (img.uids or {}).get(kind)
            if uid:
                keys.add(f"{kind}:{uid}")
    except Exception:  # noqa: BLE001 - a file that does not decode is still identified by its bytes
        pass
    _KEYS[digest] = sorted(keys)
    return _KEYS[digest]


def keys_of(files: Iterable[str | Path]) -> dict[str, list[str]]:
    """{path: content keys} for every file."""
    return {str(f): content_keys(f) for f in files}


def write_pool_record(folder: str | Path, sources: Sequence[dict[str, Any]],
                      held_out: dict[str, list[str]] | None = None) -> Path:
    """Write ``folder/pool.json``: every source file of a pool with its content keys, and what was held out.

    Args:
        folder: the pool's shard folder.
        sources: ``{"path", "source"}`` per file given to the builder.
        held_out: {path: reason} of files left out because a task tests on them.
    """
    rows = [{"path": str(s["path"]), "source": s.get("source", ""), "keys": content_keys(s["path"])}
            for s in sources]
    record = {"files": rows, "held_out": held_out or {}}
    path = Path(folder) / POOL_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


def read_pool_keys(folder: str | Path) -> dict[str, list[str]]:
    """{path: content keys} of a pool's source files, from its ``pool.json``.

    Raises:
        FileNotFoundError: the pool has no ``pool.json`` (built before it existed: rebuild it, or check it with
            ``write_pool_record`` over the paths in its ``manifest.jsonl``).
    """
    path = Path(folder) / POOL_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pool record; cannot check the pool against test sets by content "
                                "(build the pool with data_tools.make_demo lumid, or write one with "
                                "medssl.data.holdout.write_pool_record)")
    return {r["path"]: list(r["keys"]) for r in json.loads(path.read_text())["files"]}


def held_out_sources(sources: Sequence[dict[str, Any]], test_keys: dict[str, list[str]]
                     ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Split pool sources into those that may be used and those that share a content key with a test file.

    Args:
        sources: ``{"path", ...}`` per candidate pool file.
        test_keys: {name of a test file (its path, possibly with the task): its content keys}.

    Returns:
        (kept sources, {path: reason} of the held-out ones).
    """
    owner = {k: path for path, keys in test_keys.items() for k in keys}
    kept, dropped = [], {}
    for s in sources:
        hit = next((k for k in content_keys(s["path"]) if k in owner), None)
        if hit is None:
            kept.append(s)
        else:
            dropped[str(s["path"])] = f"test image: shares {hit.split(':')[0]} with {owner[hit]}"
    return kept, dropped


def check_disjoint(pool_keys: dict[str, list[str]], test_keys: dict[str, list[str]], what: str = "") -> None:
    """Raise ``PoolOverlapError`` when a pool file shares any content key with a test file.

    Args:
        pool_keys: {path: keys} of the pool's source files (``read_pool_keys``).
        test_keys: {path: keys} of a task's test files (``keys_of``).
        what: names the pool and task in the message.
    """
    owner = {k: path for path, keys in test_keys.items() for k in keys}
    hits = [(p, k) for p, keys in pool_keys.items() for k in keys if k in owner]
    if hits:
        shown = "; ".join(f"{p} ({k.split(':')[0]} of test file {owner[k]})" for p, k in hits[:5])
        raise PoolOverlapError(f"{what}: the pretraining pool holds {len({p for p, _ in hits})} test image file(s): "
                               f"{shown}{' ...' if len(hits) > 5 else ''}")
