"""Held-out test images, identified by content, and the check that a pretraining pool holds none of them.

A pretrained row of a transfer table means something only if the encoder never saw the task's test images.
Paths and names prove nothing (the same image ships in several files, transfer syntaxes and packages), so an
image is identified by its **content keys**:

- ``file:<sha256>`` of the file's bytes;
- ``pixels:<sha256>`` of the decoded pixel array (shape + float32 values): the same image re-encoded
  losslessly (another transfer syntax, ``.nii`` vs ``.nii.gz``) has the same key;
- ``instance:``, ``series:``, ``study:`` and ``patient:`` for DICOM (SHA-256 of the SOPInstanceUID,
  SeriesInstanceUID, StudyInstanceUID and PatientID, read from the header; never the ids in clear): a lossy copy
  of a test image, another slice of a test series, another series of a test study or another study of a test
  patient is refused too.

A task declares the files its test split comes from (``TaskData.test_files``; where one subject gives several
files without DICOM ids, e.g. a template and its tissue maps, it declares them all). ``build_shards`` records
the keys of every source file whose samples a shard folder holds in its ``pool.json`` (``write_pool_record``,
read from the manifest; it names source paths, so keep it private like the manifest), and ``check_disjoint``
refuses a pool that shares any key with a task's test files.
Re-encodings that change the pixels (resampling, cropping, lossy compression without DICOM ids) are not
recognised. Keys are computed once per file content and cached by the file's sha256.
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
POOL_VERSION = 2  # keys as computed here (hashed DICOM ids); a record of another version is refused, never compared
KINDS = ("file", "pixels", "instance", "series", "study", "patient")  # most specific first, for messages
_KEYS: dict[str, list[str]] = {}  # file sha256 -> content keys (files do not change under one sha256)


def _rank(key: str) -> int:
    return KINDS.index(key.split(":", 1)[0])


class PoolOverlapError(ValueError):
    """A pretraining pool holds an image of a task's test split."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dicom_ids(path: str | Path) -> dict[str, str]:
    """The identifying UIDs / IDs of a DICOM file from its header alone (whether or not its pixels decode)."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM, or unreadable: no header ids
        return {}
    ids = {"instance": ds.get("SOPInstanceUID"), "series": ds.get("SeriesInstanceUID"),
           "study": ds.get("StudyInstanceUID"), "patient": ds.get("PatientID")}
    # hashed: a pool record must not carry identifiers in clear (two hashes of one id still match)
    return {k: hashlib.sha256(str(v).strip().encode()).hexdigest()[:32] for k, v in ids.items()
            if v is not None and str(v).strip()}


def content_keys(path: str | Path) -> list[str]:
    """The content keys of one image file (see the module docstring), sorted.

    DICOM ids come from the header, so a copy whose pixels do not decode here (a codec missing) is still
    known by its instance, series, study and patient; a file that is neither readable DICOM nor a decodable
    image has its ``file:`` key only.
    """
    digest = file_sha256(path)
    if digest in _KEYS:
        return _KEYS[digest]
    keys = {f"file:{digest}"} | {f"{k}:{v}" for k, v in _dicom_ids(path).items()}
    try:
        from medssl.data.imaging import read_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = read_image(path)
        px = np.ascontiguousarray(img.pixels, dtype=np.float32)
        keys.add("pixels:" + hashlib.sha256(repr(px.shape).encode() + px.tobytes()).hexdigest())
    except Exception:  # noqa: BLE001 - a file that does not decode is still identified by its bytes and header
        pass
    _KEYS[digest] = sorted(keys)
    return _KEYS[digest]


def keys_of(files: Iterable[str | Path]) -> dict[str, list[str]]:
    """{path: content keys} for every file."""
    return {str(f): content_keys(f) for f in files}


def pool_inputs(folder: str | Path) -> list[str]:
    """The source files whose samples a shard folder holds: the inputs of its ``manifest.jsonl``'s written records
    (what was built, including anything an earlier build left there, not what the last command was given)."""
    manifest = Path(folder) / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest; not a shard folder written by build_shards")
    files: list[str] = []
    for line in manifest.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("status") == "written":
            files += rec["input"] if isinstance(rec["input"], list) else [rec["input"]]
    return sorted(set(files))


def write_pool_record(folder: str | Path, held_out: dict[str, str] | None = None) -> Path:
    """Write ``folder/pool.json``: every source file whose samples the shard folder holds, with its content keys,
    and the files held out because a task tests on them.

    Args:
        folder: a shard folder (its ``manifest.jsonl`` says which inputs were written).
        held_out: {path: reason} of files left out of the build because a task tests on them.
    """
    rows = [{"path": f, "keys": content_keys(f)} for f in pool_inputs(folder)]
    record = {"version": POOL_VERSION, "files": rows, "held_out": held_out or {}}
    path = Path(folder) / POOL_RECORD
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
    record = json.loads(path.read_text())
    if record.get("version") != POOL_VERSION:
        raise ValueError(f"{path}: a pool record of version {record.get('version')}, not {POOL_VERSION}: its keys "
                         "would not compare with today's; rewrite it with medssl.data.holdout.write_pool_record("
                         f"{str(path.parent)!r})")
    return {r["path"]: list(r["keys"]) for r in record["files"]}


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
        hit = min((k for k in content_keys(s["path"]) if k in owner), key=_rank, default=None)
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
    hits = [(p, min(shared, key=_rank)) for p, keys in pool_keys.items() if (shared := [k for k in keys if k in owner])]
    if hits:
        shown = "; ".join(f"{p} ({k.split(':')[0]} of test file {owner[k]})" for p, k in hits[:5])
        raise PoolOverlapError(f"{what}: the pretraining pool holds {len(hits)} test image file(s): "
                               f"{shown}{' ...' if len(hits) > 5 else ''}")
