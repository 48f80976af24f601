"""Atomic shard writing, `_info.json`, resume helpers; shards read back with plain tarfile and webdataset."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from medssl.data.shard_writer import (
    ShardWriter,
    finished_shards,
    next_shard_index,
    read_sample,
    remove_partial_shards,
    shard_keys,
    write_array_shards,
    write_info,
)


def _images(n: int, dtype=np.uint16) -> list[np.ndarray]:
    return [np.full((4, 5), 1000 * i + 7, dtype) for i in range(n)]


def test_shards_are_numbered_counted_and_round_trip(tmp_path):
    info = write_array_shards(_images(7), tmp_path, samples_per_shard=3)
    assert [p.name for p in finished_shards(tmp_path)] == ["lumid-000000.tar", "lumid-000001.tar",
                                                          "lumid-000002.tar"]
    assert [s["num_samples"] for s in info["shards"]] == [3, 3, 1]
    assert info["splits"]["train"]["num_samples"] == 7
    assert json.loads((tmp_path / "_info.json").read_text()) == info
    with tarfile.open(tmp_path / "lumid-000001.tar") as tar:
        names = tar.getnames()
        arr = np.load(io.BytesIO(tar.extractfile("img0000004.npy").read()))
    assert names[:2] == ["img0000003.npy", "img0000003.json"]
    assert arr.dtype == np.uint16 and int(arr[0, 0]) == 4007  # 16-bit values survive (no PIL)
    img, meta = read_sample(tmp_path / "lumid-000002.tar", "img0000006")
    assert int(img[0, 0]) == 6007 and meta["index"] == 6


def test_shard_in_progress_never_looks_complete(tmp_path):
    closed = []
    w = ShardWriter(tmp_path, samples_per_shard=2, on_close=closed.append)
    w.write("a", np.zeros((2, 2), np.uint8), {})
    w.write("b", np.ones((2, 2), np.uint8), {})
    w.write("c", np.ones((2, 2), np.uint8), {})  # shard 1 now open under a temporary name
    assert [p.name for p in finished_shards(tmp_path)] == ["lumid-000000.tar"]
    assert (tmp_path / ".lumid-000001.tar.tmp").exists() and w.pending_keys == ["c"]
    assert [r["keys"] for r in closed] == [["a", "b"]]
    assert write_info(tmp_path)["splits"]["train"]["num_samples"] == 2  # the temp shard is not counted
    # a killed run: the writer is abandoned; the next run removes the temp file and appends
    assert [p.name for p in remove_partial_shards(tmp_path)] == [".lumid-000001.tar.tmp"]
    assert next_shard_index(tmp_path) == 1
    with ShardWriter(tmp_path, 2, start_index=next_shard_index(tmp_path)) as w2:
        w2.write("c", np.ones((2, 2), np.uint8), {})
    assert shard_keys(tmp_path / "lumid-000001.tar") == ["c"]


def test_a_full_shard_leaves_nothing_pending(tmp_path):
    closed = []
    w = ShardWriter(tmp_path, samples_per_shard=2, on_close=closed.append)
    w.write("a", np.zeros((2, 2), np.uint8), {})
    w.write("b", np.ones((2, 2), np.uint8), {})  # fills shard 0: closed, nothing in progress
    assert w.pending_keys == [] and [r["keys"] for r in closed] == [["a", "b"]]
    w.write("c", np.ones((2, 2), np.uint8), {})
    assert w.pending_keys == ["c"]
    w.close()
    assert w.pending_keys == [] and [(r["count"], r["keys"]) for r in closed] == [(2, ["a", "b"]), (1, ["c"])]


def test_bad_keys_and_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="samples_per_shard"):
        ShardWriter(tmp_path, samples_per_shard=0)
    with pytest.raises(ValueError, match="start_index"):
        ShardWriter(tmp_path, start_index=-1)
    w = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="must not contain"):
        w.write("a.b", np.zeros((2, 2), np.uint8), {})
    with pytest.raises(KeyError, match="no sample"):
        write_array_shards(_images(1), tmp_path / "x")
        read_sample(tmp_path / "x" / "lumid-000000.tar", "missing")


def test_webdataset_reads_the_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    write_array_shards(_images(5), tmp_path, samples_per_shard=2, meta={"modality": "CT"})
    urls = [str(p) for p in finished_shards(tmp_path)]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        seen.append((sample["__key__"], int(arr[0, 0]), json.loads(sample["json"])["modality"]))
    assert seen == [(f"img{i:07d}", 1000 * i + 7, "CT") for i in range(5)]
